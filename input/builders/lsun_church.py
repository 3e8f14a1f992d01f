"""LSUN church_outdoor at 256x256, unconditional (label always 0, so that every image dataset of
the zoo has the same {'image', 'label'} schema).

Source: the Hugging Face hub dataset `tglcourse/lsun_church_train`, the 126,227 images of LSUN's
church_outdoor train set split into 119,915 `train` and 6,312 `test` (stored here as
`validation`), widths 256 to about 1.5k; its `label` column (16 classes named 0-f) means nothing
and is dropped. Or a local directory of images, searched recursively, all `train`, unless it
holds both `train/` and `validation/` folders, which then become the splits.

Each image is centre-cropped to a square and resized to 256 with PIL's BOX filter (an area
average, so antialiased): the LSUN convention of ADM's datasets/lsun_bedroom.py (guided-diffusion),
which BOX-resizes the short side to 256 and then centre-crops. Stored as JPEG quality 95; a source
JPEG already RGB 256x256 is stored as it is.
"""

import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from input.builders import celebahq
from input.records import IMAGE_SUFFIXES

HF_ID = 'tglcourse/lsun_church_train'
SIZE = 256
# Our split name -> the hub's.
HUB_SPLITS = {'train': 'train', 'validation': 'test'}


def local_splits(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """{split: image paths} of a local source directory."""
  if (root / 'train').is_dir() and (root / 'validation').is_dir():
    splits = {split: celebahq.image_files(root / split) for split in ('train', 'validation')}
  else:
    splits = {'train': celebahq.image_files(root)}
  for split, files in splits.items():
    if not files:
      raise FileNotFoundError(f'LSUN source {root}: no {"/".join(IMAGE_SUFFIXES)} '
                              f'images for the {split} split')
  return splits


class LsunChurch(tfds.core.GeneratorBasedBuilder):
  """LSUN church_outdoor at 256x256, JPEG, label always 0."""

  name = 'lsun_church'
  HF_ID = HF_ID
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': '256x256 JPEG (quality 95), centre crop then BOX resize, label 0.'}

  def __init__(self, *, source=None, **kwargs):
    self._source = celebahq.check_source(source)
    super().__init__(**kwargs)
    self._original_state.update(source=source)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=1),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://www.yf.io/p/lsun',
        citation="""@article{yu15lsun,
  title={LSUN: Construction of a Large-scale Image Dataset using Deep Learning with Humans in the
         Loop},
  author={Yu, Fisher and Zhang, Yinda and Song, Shuran and Seff, Ari and Xiao, Jianxiong},
  journal={arXiv preprint arXiv:1506.03365}, year={2015}}""",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._source is None:
      return {split: self._generate_examples(split) for split in HUB_SPLITS}
    return {split: self._generate_examples(split, files)
            for split, files in local_splits(self._source).items()}

  def _generate_examples(self, split, files=None):
    from PIL import Image
    if files is None:
      examples = self._hub_examples(split)
    else:
      examples = ((path.relative_to(self._source).as_posix(), path.read_bytes())
                  for path in files)
    for key, data in examples:
      yield key, {'image': celebahq.image_bytes(data, SIZE, 'jpeg', Image.Resampling.BOX),
                  'label': 0}

  def _hub_examples(self, split) -> Iterator[tuple[str, bytes]]:
    datasets = celebahq.import_datasets(HF_ID)
    data = datasets.load_dataset(HF_ID, split=HUB_SPLITS[split])
    data = data.cast_column('image', datasets.Image(decode=False))
    for i, row in enumerate(data):
      yield f'{split}/{i:06d}', celebahq.hub_image_bytes(row['image'])
