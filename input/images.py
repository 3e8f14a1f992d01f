"""Labelled images from a prepared TFDS dataset (imagenet2012, celebahq256, lsun_church, ...) or
from an image folder, decoded and augmented on the host with PIL.

Preprocessing (`augment`):
  'center'  center crop to a square, antialiased (bicubic) resize to image_size: evaluation, and
            DiT training (with `flip`), as DiT/ADM prepare ImageNet
  'inception_crop'  a random crop of 5%-100% of the area with aspect ratio in [3/4, 4/3], resized
            to image_size (the "Inception crop" of ViT/big_vision training), then `flip`
Then a random horizontal flip when `flip`. Pixels stay uint8 (a quarter of float32's bytes to
copy to the devices); the train and eval steps scale them to [-1, 1] on the device
(tasks.common.prepare_images). JPEGs are decoded at a reduced scale (PIL's draft mode: DCT
scaling) when the output needs less than a quarter of their resolution, which saves most of the
decoding time of large photographs.

Randomness is drawn per row of the GLOBAL batch from (seed, step, row), so a process split, a
resume or a different number of Grain workers gives each row the same crop and flip.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from input import common
from input import records as records_lib

AUGMENTS = ('center', 'inception_crop')


class ImageRecords(common.Source):
  """{'image': uint8 [b, S, S, 3] in [0, 255], 'label': int32 [b]}.

  Give `dataset` (a TFDS name, read from `data_dir`) or `folder` (an ImageFolder root).
  """

  def __init__(self, global_batch, image_size, split='train', dataset=None, folder=None,
               data_dir=None, train=True, augment='center', flip=True, min_area=0.05,
               num_classes=None, workers=0, threads=4, seed=0, process_index=None,
               process_count=None):
    super().__init__(global_batch, seed, train, process_index, process_count)
    if (dataset is None) == (folder is None):
      raise ValueError(f'give exactly one of dataset= and folder= (got {dataset!r}, {folder!r})')
    if augment not in AUGMENTS:
      raise ValueError(f'augment={augment!r}: use one of {AUGMENTS}')
    if not 0 < min_area <= 1:
      raise ValueError(f'min_area={min_area} must be in (0, 1]')
    self.image_size, self.augment, self.flip, self.min_area = image_size, augment, flip, min_area
    self.workers, self.threads = workers, threads
    if folder is not None:
      self.records = records_lib.FolderRecords(folder, split)
    else:
      self.records = records_lib.TFDSRecords(dataset, split, data_dir)
    self.num_examples = len(self.records)
    self.classes = self.records.class_names()
    if num_classes is not None and num_classes != len(self.classes):
      where = folder if folder is not None else f'dataset {dataset!r}'
      raise ValueError(f'NUM_CLASSES={num_classes} but {where} has {len(self.classes)} '
                       f'classes; set NUM_CLASSES={len(self.classes)}')

  def _examples(self, indices, step):
    images = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
    labels = np.empty((len(indices),), np.int32)
    for i, (record, row) in enumerate(zip(self.records.read(indices), self.rows)):
      # One generator per row of the global batch: the row's crop and flip do not depend on
      # which process or worker prepares it.
      rng = np.random.default_rng([self.seed, common.AUGMENT, step, row])
      images[i] = self.preprocess(record['image'], rng)
      labels[i] = record['label']
    return {'image': images, 'label': labels}

  def preprocess(self, encoded: bytes, rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3]; deterministic where rng is None."""
    size = self.image_size
    image = Image.open(io.BytesIO(encoded))
    width, height = image.size
    if self.train and self.augment == 'inception_crop':
      box = inception_crop_box(width, height, rng, self.min_area)
    else:
      box = center_square(width, height)
    # Decode at the smallest JPEG scale (1/2, 1/4, 1/8) that keeps the box at least twice `size`
    # on each side, so the bicubic resize still does the antialiasing (Pillow's thumbnail()
    # keeps the same reducing gap of 2); draft() reports its scale through the new image size.
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    want = (math.ceil(2 * width * size / crop_w), math.ceil(2 * height * size / crop_h))
    if image.format == 'JPEG' and want[0] < width and want[1] < height:
      image.draft('RGB', want)
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
    image = image.convert('RGB').resize((size, size), Image.BICUBIC, box=box)
    pixels = np.asarray(image, np.uint8)
    if self.train and self.flip and rng is not None and rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    return pixels


def center_square(width: int, height: int) -> tuple[int, int, int, int]:
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  return left, top, left + side, top + side


def inception_crop_box(width, height, rng, min_area=0.05, ratio=(3 / 4, 4 / 3), tries=10):
  """A random box of min_area..100% of the image's area with aspect ratio (w/h) in `ratio`,
  log-uniform; after `tries` misses, the center square (the usual fallback)."""
  area = width * height
  for _ in range(tries):
    target = area * rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return center_square(width, height)
