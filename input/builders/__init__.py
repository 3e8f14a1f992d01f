"""TFDS builders for the datasets the TFDS catalog lacks, and one way to prepare any dataset the
zoo trains on as ArrayRecord files that Grain reads by index.

    prepare('celebahq64', data_dir='/data/tfds', source='/data/celebahq')  # -> the dataset's dir
    prepare('imagenet2012', data_dir='/data/tfds', source='/data/ilsvrc')  # the two ILSVRC tars

`source` is where the raw data is: local files for the builders here (None reads the Hugging
Face hub through the `datasets` library), and the manual_dir holding ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar for tfds's own imagenet2012 (None: DATA_DIR/downloads/manual).
"""

import difflib
import os

import tensorflow_datasets as tfds

from input.builders import celebahq, lsun_church, openwebtext

BUILDERS: dict[str, type] = {
    'openwebtext': openwebtext.OpenWebText,
    'celebahq256': celebahq.CelebAHQ256,
    'celebahq64': celebahq.CelebAHQ64,
    'lsun_church': lsun_church.LsunChurch,
}
# From tfds's catalog: prepared from a manual_dir.
CATALOG = ('imagenet2012',)
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
FILE_FORMAT = 'array_record'


def names() -> list[str]:
  return [*BUILDERS, *CATALOG]


def check_name(name: str):
  if name not in names():
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
    hint = f' (did you mean {" or ".join(close)}?)' if close else ''
    raise ValueError(f'unknown dataset {name!r}{hint}; known: {", ".join(names())}')


def imagenet_manual_dir(data_dir, source=None) -> str:
  """The directory holding the ILSVRC tars: `source`, else tfds's default under data_dir."""
  if source is not None:
    return os.fspath(source)
  return os.path.join(os.fspath(data_dir), 'downloads', 'manual')


def make_builder(name: str, data_dir, source=None, **kwargs) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name` writing ArrayRecord files under `data_dir`; `kwargs` go to
  its constructor (e.g. holdout_every=4 for a small openwebtext)."""
  check_name(name)
  data_dir = os.fspath(data_dir)
  if name in BUILDERS:
    return BUILDERS[name](data_dir=data_dir, file_format=FILE_FORMAT, source=source, **kwargs)
  # tfds's own builders take no source: imagenet2012's goes to download_and_prepare.
  return tfds.builder(name, data_dir=data_dir, file_format=FILE_FORMAT, **kwargs)


def prepare(name: str, data_dir, source=None, **kwargs) -> str:
  """Prepares dataset `name` (nothing is redone if it is already prepared) and returns the
  directory holding its dataset_info.json; `kwargs` go to the builder's constructor."""
  check_name(name)
  if source is not None and not os.path.exists(source):
    raise FileNotFoundError(f'source {source} does not exist')
  builder = make_builder(name, data_dir, None if name in CATALOG else source, **kwargs)
  download_config = None
  # The checks below fail at once rather than after tfds has started writing.
  if not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
    if name == 'imagenet2012':
      manual_dir = imagenet_manual_dir(data_dir, source)
      missing = [f for f in IMAGENET_TARS if not os.path.isfile(os.path.join(manual_dir, f))]
      if missing:
        raise FileNotFoundError(f'{manual_dir} lacks {" and ".join(missing)}: imagenet2012 is '
                                f'prepared from {" and ".join(IMAGENET_TARS)} in one directory')
      download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    elif source is None:
      celebahq.import_datasets(BUILDERS[name].HF_ID)
  builder.download_and_prepare(download_config=download_config)
  return os.fspath(builder.data_dir)
