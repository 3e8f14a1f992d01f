"""DiT experiments: class-conditional flow matching on images or latents."""
from __future__ import annotations

import fiddle as fdl

from experiments import data
from experiments.base import ConfigError, Experiment
from models import dit
from tasks.diffusion import FlowMatching


class DiT(Experiment, abstract=True):
  """The family: model and objective. Data mixins set IMAGE_SIZE, CHANNELS, NUM_CLASSES."""
  PATCH = 2
  LR = 1e-4
  WARMUP = 0
  GRAD_CLIP = 0.0
  EMA_DECAY = 0.9999
  CFG_SCALE = 1.5
  CLASS_DROPOUT = 0.1
  DENOISE_STEPS = 128
  SAMPLE_CLASSES = 10          # sample grids show this many classes ...
  SAMPLES_PER_CLASS = 8        # ... with this many images each

  def validate(self):
    super().validate()
    if self.IMAGE_SIZE % self.PATCH:
      raise ConfigError(f'IMAGE_SIZE={self.IMAGE_SIZE} is not divisible by PATCH={self.PATCH}')

  def model(self):
    return fdl.Config(dit.DiT, image_size=self.IMAGE_SIZE, channels=self.CHANNELS,
                      patch=self.PATCH, hidden=self.HIDDEN, depth=self.DEPTH, heads=self.HEADS,
                      num_classes=self.NUM_CLASSES, mlp_ratio=self.MLP_RATIO,
                      attention_impl=self.ATTENTION_IMPL, remat=self.REMAT, dtype=self.DTYPE)

  def task(self):
    return fdl.Config(FlowMatching, num_classes=self.NUM_CLASSES, image_size=self.IMAGE_SIZE,
                      channels=self.CHANNELS, denoise_timesteps=self.DENOISE_STEPS,
                      class_dropout_prob=self.CLASS_DROPOUT, cfg_scale=self.CFG_SCALE,
                      sample_classes=min(self.SAMPLE_CLASSES, self.NUM_CLASSES),
                      samples_per_class=self.SAMPLES_PER_CLASS)

  def flops_per_example(self):
    return dit.flops_per_example(self.IMAGE_SIZE, self.CHANNELS, self.PATCH, self.HIDDEN,
                                 self.DEPTH, self.MLP_RATIO)


class DiT_T_FashionMNIST(data.FashionMNISTData, DiT):
  """DiT-T/4 on Fashion-MNIST 28x28, the main job: `python launch.py --exp=DiT_T_FashionMNIST
  --workdir=workdirs/dit_t_fmnist`. About 12 minutes on 2 CPU cores (800 steps of 32 images,
  0.8 s each); the per-class sample grids (Euler, 32 steps, CFG 1.5) show the garment classes'
  shapes; docs/RESULTS.md has the measured loss and the grid."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['T']
  PATCH = 4
  GLOBAL_BATCH = 32
  LR = 4e-4
  WARMUP = 50
  NUM_STEPS = 800
  EMA_DECAY = 0.99
  LOG_EVERY = 25
  EVAL_EVERY = 400
  EVAL_BATCHES = 20
  SAMPLE_EVERY = 200           # a grid every 200 steps (about 11 s each on 2 CPU cores)
  CKPT_EVERY = 400
  DENOISE_STEPS = 32
  SAMPLES_PER_CLASS = 8


class DiT_T_Synthetic(data.SyntheticImageData, DiT):
  """Tiny DiT on synthetic 16x16x3 images, for tests and smoke runs: `python launch.py
  --exp=DiT_T_Synthetic --workdir=workdirs/dit`. About 20 s on a CPU; a smoke test, not a
  learning curve: its loss stays near 1.2 over the 20 steps."""
  HIDDEN, DEPTH, HEADS = 64, 2, 4
  IMAGE_SIZE = 16
  PATCH = 4
  GLOBAL_BATCH = 16
  NUM_STEPS = 20
  LOG_EVERY = 5
  EVAL_EVERY = 10
  EVAL_BATCHES = 2
  CKPT_EVERY = 10
  DENOISE_STEPS = 8
  SAMPLES_PER_CLASS = 2
  EMA_DECAY = 0.9


class DiT_S_ImageNet256(data.ImageNet256Data, DiT):
  """DiT-S/16 on ImageNet 256x256 pixels (33M params): prepare the data once with `python
  tools/build_dataset.py imagenet2012 --data_dir=D --source=M` (M holds ILSVRC2012_img_train.tar
  and ILSVRC2012_img_val.tar), then `python launch.py --exp=DiT_S_ImageNet256 --workdir=W --set
  DATA_DIR=D`. Pixels with patch 16 give the 256 tokens that the paper's /2 models see on
  32x32x4 VAE latents, so the step costs the same; the paper's FID-50K (68.4 for S/2 after 400K
  steps of batch 256) is for latents, and no pixel-space run has been measured here."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['S']
  PATCH = 16
  GLOBAL_BATCH = 256
  NUM_STEPS = 400_000
  LOG_EVERY = 100
  EVAL_EVERY = 10_000
  EVAL_BATCHES = 20
  CKPT_EVERY = 5_000
  DATA_WORKERS = 8


class DiT_B_ImageNet256(DiT_S_ImageNet256):
  """DiT-B/16 on ImageNet 256 pixels (131M params): `python launch.py --exp=DiT_B_ImageNet256
  --workdir=W --set DATA_DIR=D` after preparing imagenet2012 (see DiT_S_ImageNet256). Paper,
  on latents: FID-50K 43.5 after 400K steps; about 10 hours on one H200 (scaled by FLOPs from
  DiT-XL's measured rate)."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['B']


class DiT_B_ImageNet(DiT_B_ImageNet256):
  """Same as DiT_B_ImageNet256, the name the docs use: `python launch.py --exp=DiT_B_ImageNet
  --workdir=W --set DATA_DIR=D` after preparing imagenet2012 (see DiT_S_ImageNet256)."""


class DiT_L_ImageNet256(DiT_S_ImageNet256):
  """DiT-L/16 on ImageNet 256 pixels (459M params): `python launch.py --exp=DiT_L_ImageNet256
  --workdir=W --set DATA_DIR=D` after preparing imagenet2012 (see DiT_S_ImageNet256). Paper,
  on latents: FID-50K 23.3 after 400K steps; about 33 hours on one H200 (FLOPs estimate)."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['L']


class DiT_XL_ImageNet256(DiT_S_ImageNet256):
  """DiT-XL/16 on ImageNet 256 pixels (677M params): `python launch.py --exp=DiT_XL_ImageNet256
  --workdir=W --set DATA_DIR=D --set ATTENTION_IMPL=cudnn --set DTYPE=bfloat16` after
  preparing imagenet2012 (see DiT_S_ImageNet256). Paper, on latents: FID-50K 19.5 after 400K
  steps (2.27 with CFG 1.5 after 7M). One H200 ran 588 images/s at this token count
  (docs/PERFORMANCE.md), so 400K steps of 256 take about 48 hours there."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['XL']


class DiT_B_Pixels256(DiT, abstract=True):
  """DiT-B/16 on 256x256 pixels at batch 64: the recipe the CelebA-HQ and LSUN runs share."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['B']
  PATCH = 16
  GLOBAL_BATCH = 64
  NUM_STEPS = 200_000
  LOG_EVERY = 100
  EVAL_EVERY = 10_000
  EVAL_BATCHES = 20
  SAMPLE_EVERY = 10_000
  CKPT_EVERY = 5_000
  DATA_WORKERS = 4


class DiT_B_CelebAHQ256(data.CelebAHQData, DiT_B_Pixels256):
  """DiT-B/16 on CelebA-HQ 256x256 pixels, conditioned on female/male: prepare with `python
  tools/build_dataset.py celebahq256 --data_dir=D [--source=M]`, then `python launch.py
  --exp=DiT_B_CelebAHQ256 --workdir=W --set DATA_DIR=D`. 30K faces; no measured run yet."""
  SAMPLE_CLASSES = 2


class DiT_B_LSUNChurch256(data.LSUNChurchData, DiT_B_Pixels256):
  """DiT-B/16 on LSUN church_outdoor 256x256 pixels, unconditional: prepare with `python
  tools/build_dataset.py lsun_church --data_dir=D [--source=M]`, then `python launch.py
  --exp=DiT_B_LSUNChurch256 --workdir=W --set DATA_DIR=D`. One class, so guidance is off
  (CFG_SCALE=1); no measured run yet."""
  CFG_SCALE = 1.0
  CLASS_DROPOUT = 0.0
  SAMPLE_CLASSES = 1
  SAMPLES_PER_CLASS = 16


class DiT_XL_Synthetic(data.SyntheticImageData, DiT):
  """DiT-XL/2 at the ImageNet-256 latent shape on synthetic data, the speed benchmark's workload:
  `python tools/benchmark.py --exp=DiT_XL_Synthetic` (or `python launch.py
  --exp=DiT_XL_Synthetic --workdir=...`). One H200: 0.44 s per step of 256 with cuDNN attention."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['XL']
  IMAGE_SIZE = 32
  CHANNELS = 4
  NUM_CLASSES = 1000
  GLOBAL_BATCH = 256
  DTYPE = 'bfloat16'
