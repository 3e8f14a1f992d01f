"""VAE experiments: a small AutoencoderKL (diffusers' architecture, models/vae.py) trained here,
to give a latent DiT a VAE where no pretrained one fits (Fashion-MNIST's 28x28 grey images).
`python tools/train_vae.py` runs one and writes it in diffusers' format."""
from __future__ import annotations

import fiddle as fdl

from experiments import data
from experiments.base import ConfigError, Experiment
from models import vae
from tasks.autoencoding import Autoencoding


class VAE(Experiment, abstract=True):
  """The family: an AutoencoderKL of BLOCK_OUT_CHANNELS levels (downsampling by 2 between
  them), trained with an L1 reconstruction + KL_WEIGHT * KL loss."""
  BLOCK_OUT_CHANNELS = (32, 64, 64)
  LAYERS_PER_BLOCK = 1
  LATENT_CHANNELS = 4
  NORM_GROUPS = 16
  MID_ATTENTION = True
  KL_WEIGHT = 1e-6
  LR = 4e-4
  WARMUP = 100
  GRAD_CLIP = 1.0

  def validate(self):
    super().validate()
    factor = 2 ** (len(self.BLOCK_OUT_CHANNELS) - 1)
    if self.IMAGE_SIZE % factor:
      raise ConfigError(f'IMAGE_SIZE={self.IMAGE_SIZE} is not divisible by the VAE\'s '
                        f'downsampling factor {factor} ({len(self.BLOCK_OUT_CHANNELS)} levels)')
    odd = [c for c in self.BLOCK_OUT_CHANNELS if c % self.NORM_GROUPS]
    if odd:
      raise ConfigError(f'BLOCK_OUT_CHANNELS {odd} are not divisible by '
                        f'NORM_GROUPS={self.NORM_GROUPS}')

  def vae_config(self) -> fdl.Config:
    levels = len(self.BLOCK_OUT_CHANNELS)
    return fdl.Config(vae.VAEConfig, in_channels=self.CHANNELS, out_channels=self.CHANNELS,
                      down_block_types=(vae.DOWN_BLOCK,) * levels,
                      up_block_types=(vae.UP_BLOCK,) * levels,
                      block_out_channels=tuple(self.BLOCK_OUT_CHANNELS),
                      layers_per_block=self.LAYERS_PER_BLOCK,
                      latent_channels=self.LATENT_CHANNELS, norm_num_groups=self.NORM_GROUPS,
                      sample_size=self.IMAGE_SIZE, mid_block_add_attention=self.MID_ATTENTION)

  def model(self):
    return fdl.Config(vae.AutoencoderKL, config=self.vae_config(), dtype=self.DTYPE)

  def task(self):
    return fdl.Config(Autoencoding, image_size=self.IMAGE_SIZE, channels=self.CHANNELS,
                      kl_weight=self.KL_WEIGHT)


class VAE_T_FashionMNIST(data.FashionMNISTData, VAE):
  """A 0.24M-parameter VAE for Fashion-MNIST: 28x28x1 -> 7x7x4 latents. `python tools/train_vae.py`
  trains it (about 5 minutes on 2 CPU cores: convolution gradients are slow on XLA's CPU backend,
  so it is small and briefly trained) and writes it in diffusers' format to
  workdirs/vae_t_fmnist/diffusers, where DiT_T_FashionMNIST_Latent looks for it; `python
  launch.py --exp=VAE_T_FashionMNIST --workdir=workdirs/vae_t_fmnist` runs the training alone.
  docs/RESULTS.md has its reconstruction error."""
  BLOCK_OUT_CHANNELS = (16, 32, 32)
  NORM_GROUPS = 8
  GLOBAL_BATCH = 32
  LR = 1e-3
  NUM_STEPS = 600
  LOG_EVERY = 50
  EVAL_EVERY = 300
  EVAL_BATCHES = 20
  CKPT_EVERY = 300
