"""Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes) from the idx files that the Debian
package `dataset-fashion-mnist` installs; TFDS is the fallback where those are absent."""

import functools
import gzip
import pathlib

import numpy as np

from input import common

DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
          'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
_SIZE = 28


def read_idx(path) -> np.ndarray:
  """An idx file: 2 zero bytes, a type byte (8 = uint8), the rank, big-endian uint32 dims, data."""
  with (gzip.open if str(path).endswith('.gz') else open)(path, 'rb') as f:
    data = f.read()
  if data[:2] != b'\0\0' or data[2] != 8:
    raise ValueError(f'{path} is not a uint8 idx file (header {data[:4].hex()})')
  rank = data[3]
  dims = np.frombuffer(data, '>u4', count=rank, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(dims)


def _from_tfds(split):
  """The split as (images, labels) from a copy TFDS already prepared, or None (no TensorFlow, or
  no prepared copy: nothing is downloaded here, so an offline machine fails with our message)."""
  try:
    import tensorflow  # noqa: F401  tfds.load needs it; checking first avoids a confusing error
    import tensorflow_datasets as tfds
  except ImportError:
    return None
  try:
    data = tfds.as_numpy(tfds.load('fashion_mnist', split=split, batch_size=-1, download=False))
  except Exception:  # tfds raises assorted errors for a dataset that is not prepared
    return None
  return data['image'][..., 0], data['label']


@functools.lru_cache(maxsize=None)
def load(split: str = 'train', data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [n, 28, 28], int32 [n]) for a split, read once per process and shared read-only."""
  root = pathlib.Path(data_dir)
  paths = [root / name for name in _FILES[split]]
  if all(path.is_file() for path in paths):
    images, labels = (read_idx(path) for path in paths)
  elif (found := _from_tfds(split)) is not None:
    images, labels = found
  else:
    missing = next(path for path in paths if not path.is_file())
    raise FileNotFoundError(
        f'Fashion-MNIST: {missing} not found. Install it with `apt-get install '
        f'dataset-fashion-mnist`, or pass data_dir=DIR holding {", ".join(_FILES["train"])}, '
        f'{", ".join(_FILES["test"])} (a copy prepared by tensorflow_datasets also works).')
  images, labels = np.ascontiguousarray(images, np.uint8), labels.astype(np.int32)
  if images.shape[1:] != (_SIZE, _SIZE) or len(images) != len(labels):
    raise ValueError(f'Fashion-MNIST {split}: images {images.shape} do not match labels '
                     f'{labels.shape}')
  images.flags.writeable = labels.flags.writeable = False
  return images, labels


def translate(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """Each image [H, W] moved by its (rows, cols) shift (positive: down, right), black filled."""
  n, hh, ww = images.shape
  s = int(np.abs(shifts).max(initial=0))
  padded = np.pad(images, ((0, 0), (s, s), (s, s)))
  rows = s - shifts[:, 0, None] + np.arange(hh)                        # [n, H] source rows
  cols = s - shifts[:, 1, None] + np.arange(ww)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def erasing(rng: np.random.Generator, prob: float, n: int, hh: int, ww: int):
  """Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation") for n images [H, W]:
  (where [n, H, W] bool, noise [n, H, W] uint8). With probability `prob` an image gets one
  rectangle of 2-40% of its area and aspect ratio 0.3-3.3 (the paper's ranges; the ratio drawn
  log-uniform, as torchvision does, and a side longer than the image clipped to it instead of
  drawn again), anywhere inside it, to be filled with uniform random pixels."""
  apply = rng.random(n) < prob
  area = rng.uniform(0.02, 0.4, n) * hh * ww
  ratio = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3), n))
  h = np.clip(np.round(np.sqrt(area * ratio)), 1, hh).astype(int)
  w = np.clip(np.round(np.sqrt(area / ratio)), 1, ww).astype(int)
  top = (rng.random(n) * (hh - h + 1)).astype(int)
  left = (rng.random(n) * (ww - w + 1)).astype(int)
  noise = rng.integers(0, 256, (n, hh, ww), dtype=np.uint8)
  rows, cols = np.arange(hh)[None, :, None], np.arange(ww)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]))
  return inside & apply[:, None, None], noise


class FashionMNIST(common.Source):
  """{'image': uint8 [b, S, S, 1] in [0, 255], 'label': int32 [b]}; random horizontal flips when
  `train`, and with `shift` > 0 a random translation of up to `shift` pixels each way, the
  uncovered border black (the background), and with `erase` > 0 random erasing with that
  probability (`erase`); all are drawn per row from (seed, step). S > 28
  pads with black (0) around the centre, S < 28 resizes (bilinear, antialiased).
  Images travel as uint8 (a quarter of float32's bytes); the train and eval steps scale them to
  [-1, 1] on the device (tasks.common.prepare_images)."""

  def __init__(self, global_batch, split='train', image_size=28, train=True, seed=0,
               data_dir=None, process_index=None, process_count=None, shift=0, erase=0.0):
    super().__init__(global_batch, seed, train, process_index, process_count)
    if split not in _FILES:
      raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
      raise ValueError(f'image_size must be a positive int, got {image_size!r}')
    if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift < _SIZE:
      raise ValueError(f'shift must be an int in [0, {_SIZE}), got {shift!r}')
    if isinstance(erase, bool) or not isinstance(erase, (int, float)) or not 0 <= erase <= 1:
      raise ValueError(f'erase must be a probability in [0, 1], got {erase!r}')
    self.split, self.image_size, self.shift, self.erase = split, image_size, shift, erase
    self._images, self._labels = load(split, str(data_dir or DEFAULT_DIR))
    self.num_examples = len(self._labels)

  def _examples(self, indices, step):
    images = self._images[indices]
    if self.train:
      rng = self._augment_rng(step)
      flip = rng.random(self.global_batch)[self.rows] < 0.5
      images = np.where(flip[:, None, None], images[:, :, ::-1], images)
      if self.shift:
        images = translate(images, rng.integers(-self.shift, self.shift + 1,
                                                (self.global_batch, 2))[self.rows])
      if self.erase:
        where, noise = erasing(rng, self.erase, self.global_batch, *images.shape[1:])
        images = np.where(where[self.rows], noise[self.rows], images)
    size = self.image_size
    if size < _SIZE:
      from PIL import Image  # Only this path needs it.
      images = np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR))
                         for x in images])
    if size > _SIZE:
      before = (size - _SIZE) // 2
      pad = (before, size - _SIZE - before)
      images = np.pad(images, ((0, 0), pad, pad), constant_values=0)
    return {'image': images[..., None], 'label': self._labels[indices]}
