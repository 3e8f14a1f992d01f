"""CelebA-HQ (30,000 faces: 28,000 train, 2,000 validation) at 256x256 and 64x64, labelled
female/male.

Source: the Hugging Face hub dataset `korexyz/celeba-hq-256x256` (splits train and validation,
an `image` column and a `label` ClassLabel with names female, male), read with the `datasets`
library, or a local directory in that dataset's layout, SOURCE/<split>/<female|male>/*.jpg
(.jpeg, .png and .webp too); every split folder present becomes a split.

Each image is centre-cropped to a square (a no-op for CelebA-HQ, which is square) and resized
with PIL's BICUBIC filter over the whole support (no reducing_gap: exact, and 30k images make
speed moot); PIL widens the filter by the scale factor when shrinking, so this antialiases.
256x256 is stored as JPEG quality 95 with 4:4:4 chroma (several times smaller than PNG, and no
chroma blur at the resolution models see); a source image that already is an RGB 256x256 JPEG is
stored as it is rather than through a second JPEG generation. 64x64 is stored as PNG:
at 64 pixels JPEG's 8x8 blocks are an eighth of the image, and PNG costs only about 10 KB.
"""

import io
import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from input.images import center_square
from input.records import IMAGE_SUFFIXES

HF_ID = 'korexyz/celeba-hq-256x256'
LABELS = ('female', 'male')
JPEG_QUALITY = 95


def square_resize(image, size: int, resample=None):
  """RGB PIL image: the centred square of `image`, resized to size x size (BICUBIC by default).

  The crop is passed to resize as its box, so the filter reads the pixels just outside the
  square instead of padding at its edges."""
  from PIL import Image
  if resample is None:
    resample = Image.Resampling.BICUBIC
  image = image.convert('RGB')
  if image.size == (size, size):
    return image
  return image.resize((size, size), resample, box=center_square(*image.size))


def encode(image, encoding_format: str) -> bytes:
  """PNG or JPEG bytes of a PIL image, encoded here so the quality is ours, not a default
  (tfds's Image feature saves PIL images with PIL's default JPEG quality, 75)."""
  out = io.BytesIO()
  if encoding_format == 'jpeg':
    image.save(out, format='JPEG', quality=JPEG_QUALITY, subsampling=0)
  else:
    image.save(out, format='PNG')
  return out.getvalue()


def image_bytes(data: bytes, size: int, encoding_format: str, resample=None) -> bytes:
  """The stored bytes of one source image: a JPEG that is already RGB size x size is kept as it
  is when storing JPEG (a second JPEG generation would only lose detail); anything else is
  cropped, resized and encoded."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as image:
    if (encoding_format == 'jpeg' and image.format == 'JPEG' and image.mode == 'RGB'
        and image.size == (size, size)):
      return data
    return encode(square_resize(image, size, resample), encoding_format)


def image_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `directory` (recursively), in sorted order."""
  return sorted(p for p in directory.rglob('*')
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def import_datasets(hf_id: str):
  try:
    import datasets
  except ImportError as e:
    raise ImportError(f'Reading {hf_id} from the Hugging Face hub needs the datasets library: '
                      'pip install datasets (or pass a local source)') from e
  return datasets


def hub_image_bytes(image: dict) -> bytes:
  """The encoded bytes of a `datasets.Image(decode=False)` value: inline, or in a cached file."""
  if image.get('bytes') is not None:
    return image['bytes']
  return pathlib.Path(image['path']).read_bytes()


def check_source(source) -> pathlib.Path | None:
  if source is None:
    return None
  path = pathlib.Path(source)
  if not path.is_dir():
    raise FileNotFoundError(f'source directory {path} does not exist')
  return path


def local_splits(root: pathlib.Path) -> dict[str, list[tuple[pathlib.Path, str]]]:
  """{split: [(image path, label name)]} of a directory laid out as root/<split>/<label>/*."""
  splits = {}
  for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    unknown = set(classes) - set(LABELS)
    if unknown:
      raise ValueError(f'{split_dir} has class folders {sorted(unknown)}; expected only '
                       f'{list(LABELS)}')
    files = [(path, label) for label in classes for path in image_files(split_dir / label)]
    if files:
      splits[split_dir.name] = files
  if not splits:
    raise FileNotFoundError(f'{root} holds no images in the layout <split>/<female|male>/*.jpg')
  return splits


class _CelebAHQ(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """CelebA-HQ at SIZE x SIZE; subclasses set SIZE and ENCODING."""

  SIZE: int
  ENCODING: str
  HF_ID = HF_ID
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, source=None, **kwargs):
    self._source = check_source(source)
    super().__init__(**kwargs)
    self._original_state.update(source=source)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(self.SIZE, self.SIZE, 3),
                                         encoding_format=self.ENCODING),
            'label': tfds.features.ClassLabel(names=list(LABELS)),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/tkarras/progressive_growing_of_gans',
        citation="""@inproceedings{karras2018progressive,
  title={Progressive Growing of {GAN}s for Improved Quality, Stability, and Variation},
  author={Tero Karras and Timo Aila and Samuli Laine and Jaakko Lehtinen},
  booktitle={International Conference on Learning Representations}, year={2018}}""",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._source is None:
      return {split: self._generate_examples(split) for split in ('train', 'validation')}
    return {split: self._generate_examples(split, files)
            for split, files in local_splits(self._source).items()}

  def _generate_examples(self, split, files=None):
    if files is None:
      examples = self._hub_examples(split)
    else:
      examples = ((path.relative_to(self._source).as_posix(), path.read_bytes(), label)
                  for path, label in files)
    for key, data, label in examples:
      yield key, {'image': image_bytes(data, self.SIZE, self.ENCODING), 'label': label}

  def _hub_examples(self, split) -> Iterator[tuple]:
    datasets = import_datasets(HF_ID)
    data = datasets.load_dataset(HF_ID, split=split)
    # Labels go by name, so a hub copy that orders its classes differently still maps right.
    names = [n.strip().lower() for n in data.features['label'].names]
    if sorted(names) != sorted(LABELS):
      raise ValueError(f'{HF_ID} has labels {names}, expected {list(LABELS)}')
    # The encoded bytes, not PIL images: a JPEG already at our size is kept as it is.
    data = data.cast_column('image', datasets.Image(decode=False))
    for i, row in enumerate(data):
      yield f'{split}/{i:06d}', hub_image_bytes(row['image']), names[row['label']]


class CelebAHQ256(_CelebAHQ):
  """CelebA-HQ at 256x256, JPEG quality 95, labelled female/male."""

  name = 'celebahq256'
  SIZE = 256
  ENCODING = 'jpeg'
  RELEASE_NOTES = {'1.0.0': '256x256 JPEG (quality 95, 4:4:4), female/male labels.'}


class CelebAHQ64(_CelebAHQ):
  """CelebA-HQ at 64x64, PNG, labelled female/male."""

  name = 'celebahq64'
  SIZE = 64
  ENCODING = 'png'
  RELEASE_NOTES = {'1.0.0': '64x64 PNG, female/male labels.'}
