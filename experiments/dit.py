"""DiT experiments: class-conditional flow matching on images or latents."""
from __future__ import annotations

import fiddle as fdl

from experiments import data
from experiments.base import AtScale, ConfigError, Experiment
from input.latents import LatentRecords
from models import dit
from models import inception
from models import vae
from tasks import diffusion
from tasks.diffusion import FlowMatching
from tasks.fid import SampleJudge
from trainer.restore import TrainedClassifier


class DiT(Experiment, abstract=True):
  """The family: model and objective. Data mixins set IMAGE_SIZE, CHANNELS, NUM_CLASSES.

  With USE_VAE the DiT works on the latents of a frozen VAE (diffusers' AutoencoderKL format, see
  models/vae.py): each step encodes its images and draws a posterior sample (or, with
  LATENTS_DIR, reads posterior moments that tools/encode_latents.py stored once), and sample
  grids are decoded back to pixels. IMAGE_SIZE stays the pixel size; the DiT sees
  IMAGE_SIZE / VAE_DOWNSAMPLE squared latents with LATENT_CHANNELS channels.
  """
  PATCH = 2
  USE_VAE = False
  VAE_PATH = 'stabilityai/sd-vae-ft-ema'  # a diffusers AutoencoderKL directory, or a hub id
  VAE_DOWNSAMPLE = 8               # image size / latent size of that VAE
  LATENT_CHANNELS = 4
  LATENTS_DIR = None               # pre-encoded latents (tools/encode_latents.py) to read instead
  VAE_HINT = ''                    # added to the error when the VAE is missing: how to get it
  LR = 1e-4
  WARMUP = 0
  GRAD_CLIP = 0.0
  EMA_DECAY = 0.9999
  CFG_SCALE = 1.5
  CFG_INTERVAL = (0.0, 1.0)    # sampler times t (0: noise, 1: data) in [lo, hi) get guidance
  DECODER_CONV = 0             # > 0: a 3x3 convolution of this many channels ends the decoder
  DECODER_OVERLAP = False      # each token decodes a 2p x 2p block overlapping its neighbours'
  EMBED_MARGIN = 0             # > 0: each token embeds its patch and this many pixels around it
  GRID_SHIFT = 'none'          # each network call cuts the image with a randomly shifted patch
                               # grid (models/dit.py): 'none' | 'pad' (on a canvas one patch
                               # larger) | 'roll' (the image rolled as a torus; no extra tokens)
  CLASS_DROPOUT = 0.1
  DENOISE_STEPS = 128          # steps of the sampler (and the grid of T_SAMPLING='grid')
  SAMPLER = 'euler'            # 'euler' (1 velocity call a step) | 'heun' (2 calls, 2nd order)
  T_SAMPLING = 'uniform'       # training t: 'uniform' | 'logit_normal' (SD3) | 'grid'
  CHOICES = {**Experiment.CHOICES, 'T_SAMPLING': diffusion.T_SAMPLING,
             'SAMPLER': tuple(diffusion.SAMPLERS), 'GRID_SHIFT': ('none', *dit.SHIFT_MODES)}
  SAMPLE_CLASSES = 10          # sample grids show this many classes ...
  SAMPLES_PER_CLASS = 8        # ... with this many images each
  # Sample quality, logged as eval/fid (see tasks/fid.py). Without the Inception weights file
  # (tools/convert_inception.py makes it) training warns once and goes on.
  FID_NUM = 0                  # samples per FID; 0: none
  FID_EVERY = 0                # steps between FIDs; 0: at the last step only
  FID_REF = None               # reference statistics .npz (tools/fid_stats.py, or ADM's
                               # reference batch); None: computed from the eval split
  FID_REF_NUM = 50_000         # eval-split images the computed reference uses at most
  FID_BATCH = 0                # samples drawn at once; 0: GLOBAL_BATCH
  INCEPTION_PATH = 'weights/fid_inception_v3.npz'
  # A classifier trained here instead of Inception: the Fréchet distance on its features is
  # logged as eval/<FD_NAME>, and its accuracy on the samples as eval/class_consistency.
  JUDGE_EXP = None             # its experiment, e.g. 'ViT_T_FashionMNIST_Judge'
  JUDGE_DIR = None             # and its workdir
  FD_NAME = 'fd'

  def validate(self):
    super().validate()
    if self.USE_VAE and self.IMAGE_SIZE % self.VAE_DOWNSAMPLE:
      raise ConfigError(f'IMAGE_SIZE={self.IMAGE_SIZE} is not divisible by '
                        f'VAE_DOWNSAMPLE={self.VAE_DOWNSAMPLE}')
    size, _ = self.input_shape()
    if size % self.PATCH:
      what = 'latent size' if self.USE_VAE else 'IMAGE_SIZE'
      raise ConfigError(f'{what}={size} is not divisible by PATCH={self.PATCH}')
    lo_hi = self.CFG_INTERVAL
    if (not isinstance(lo_hi, (tuple, list)) or len(lo_hi) != 2
        or not all(isinstance(v, (int, float)) for v in lo_hi)
        or not 0 <= lo_hi[0] < lo_hi[1] <= 1):
      raise ConfigError(f'CFG_INTERVAL={lo_hi!r}: the guided sampler times, a pair (lo, hi) with '
                        '0 <= lo < hi <= 1, e.g. "(0.2, 0.8)"; (0, 1) guides every step')
    if self.DECODER_OVERLAP and (self.PATCH % 2 or self.DECODER_CONV):
      raise ConfigError(f'DECODER_OVERLAP needs an even PATCH (got {self.PATCH}) and '
                        f'DECODER_CONV=0 (got {self.DECODER_CONV})')
    if not 0 <= self.EMBED_MARGIN <= size:
      raise ConfigError(f'EMBED_MARGIN={self.EMBED_MARGIN}: the pixels each patch embedding '
                        f'reaches into its neighbours, from 0 to the input size {size}; '
                        f'PATCH // 2 = {self.PATCH // 2} makes windows twice the patch')
    if self.GRID_SHIFT != 'none' and self.PATCH < 2:
      raise ConfigError(f'GRID_SHIFT shifts the patch grid by 0 to PATCH - 1 pixels, so it needs '
                        f'PATCH >= 2 (got {self.PATCH})')
    if self.LATENTS_DIR and not self.USE_VAE:
      raise ConfigError('LATENTS_DIR needs USE_VAE=True (the VAE decodes the samples)')

  def input_shape(self) -> tuple[int, int]:
    """(size, channels) of what the DiT sees: the images, or their latents."""
    if self.USE_VAE:
      return self.IMAGE_SIZE // self.VAE_DOWNSAMPLE, self.LATENT_CHANNELS
    return self.IMAGE_SIZE, self.CHANNELS

  def codec(self):
    if not self.USE_VAE:
      return None
    return fdl.Config(vae.PretrainedVAE, path=self.VAE_PATH, dtype=self.DTYPE,
                      downsample=self.VAE_DOWNSAMPLE, latent_channels=self.LATENT_CHANNELS,
                      missing_hint=self.VAE_HINT)

  def judge(self):
    if not self.FID_NUM:
      return None
    if self.JUDGE_EXP:
      features = fdl.Partial(TrainedClassifier, exp=self.JUDGE_EXP, workdir=self.JUDGE_DIR)
      name = self.FD_NAME
    else:
      features, name = fdl.Partial(inception.FIDInception, path=self.INCEPTION_PATH), 'fid'
    return fdl.Config(SampleJudge, features=features, num_samples=self.FID_NUM,
                      every=self.FID_EVERY, name=name, reference=self.FID_REF,
                      reference_num=self.FID_REF_NUM, batch_size=self.FID_BATCH,
                      seam_period=self.PATCH * (self.VAE_DOWNSAMPLE if self.USE_VAE else 1))

  def config(self):
    cfg = super().config()
    if self.LATENTS_DIR:   # the pre-encoded latents replace whatever source the data mixin set
      size, channels = self.input_shape()
      for name, split, train in (('train_data', getattr(self, 'TRAIN_SPLIT', 'train'), True),
                                 ('eval_data', getattr(self, 'EVAL_SPLIT', 'test'), False)):
        setattr(cfg, name, fdl.Config(
            LatentRecords, global_batch=self.GLOBAL_BATCH, directory=self.LATENTS_DIR,
            split=split, latent_size=size, latent_channels=channels, train=train,
            flip=getattr(self, 'FLIP', True), seed=self.SEED))
    return cfg

  def model(self):
    size, channels = self.input_shape()
    return fdl.Config(dit.DiT, image_size=size, channels=channels,
                      patch=self.PATCH, hidden=self.HIDDEN, depth=self.DEPTH, heads=self.HEADS,
                      num_classes=self.NUM_CLASSES, mlp_ratio=self.MLP_RATIO,
                      decoder_conv=self.DECODER_CONV, decoder_overlap=self.DECODER_OVERLAP,
                      embed_margin=self.EMBED_MARGIN,
                      shift_mode='pad' if self.GRID_SHIFT == 'none' else self.GRID_SHIFT,
                      **self.backbone_fields())

  def task(self):
    size, channels = self.input_shape()
    return fdl.Config(FlowMatching, num_classes=self.NUM_CLASSES, image_size=size,
                      channels=channels, denoise_timesteps=self.DENOISE_STEPS,
                      class_dropout_prob=self.CLASS_DROPOUT, cfg_scale=self.CFG_SCALE,
                      sample_classes=min(self.SAMPLE_CLASSES, self.NUM_CLASSES),
                      samples_per_class=self.SAMPLES_PER_CLASS, t_sampling=self.T_SAMPLING,
                      class_names=getattr(self, 'CLASS_NAMES', ()), sampler=self.SAMPLER,
                      cfg_interval=tuple(self.CFG_INTERVAL),
                      shift_period=0 if self.GRID_SHIFT == 'none' else self.PATCH)

  def flops_per_example(self):
    """The DiT's own FLOPs; a frozen VAE's encoding is not counted (MFU is the model's)."""
    size, channels = self.input_shape()
    return dit.flops_per_example(size, channels, self.PATCH, self.HIDDEN, self.DEPTH,
                                 self.MLP_RATIO, decoder_conv=self.DECODER_CONV,
                                 decoder_overlap=self.DECODER_OVERLAP,
                                 embed_margin=self.EMBED_MARGIN,
                                 grid_shift=self.GRID_SHIFT == 'pad')


class DiT_T_FashionMNIST(data.FashionMNISTData, DiT):
  """A small DiT/4 on Fashion-MNIST 28x28 (hidden 96, depth 6, 4 heads; 1.1M params), the main
  job: `python launch.py --exp=DiT_T_FashionMNIST --workdir=workdirs/dit_t_fmnist`. 3000 steps
  of 32 images, then 1000 samples judged by ViT_T_FashionMNIST_Judge when that is trained: the
  Fréchet distance on its features, eval/fd_fmnist, and its accuracy on them,
  eval/class_consistency, with the ratios to its accuracy on real images, per class too. Samples
  (and the per-class grids) take 32 Euler steps with guidance 3 applied only for t in
  [0.15, 0.8) (CFG_INTERVAL): more consistent than full guidance at 2 (1.08x against 1.07x) at a
  lower Fréchet distance (2.51 against 3.07), measured at 2600 steps. The step projects q, k, v
  in one matmul (FUSED_QKV) and runs its six blocks unrolled, storing their activations for the
  backward pass: with TCMalloc (trainer/allocator.py, which launch.py preloads) that was 1.22x
  faster a step than the scanned, recomputing step (REMAT='full') this recipe had before
  2026-12-04, whose stacked buffers glibc's malloc faulted in afresh each step: with glibc's
  malloc the old step is 1.6x faster (`--set SCAN_LAYERS=True --set REMAT=full`;
  docs/PERFORMANCE.md). Neither changes the function, the parameters or the initial draw.
  Each token embeds its 4x4 patch with 2 pixels of its neighbours
  around it (EMBED_MARGIN) and decodes an 8x8 block summed where blocks overlap
  (DECODER_OVERLAP): together they bring the samples' seam ratio (the step across patch
  borders against the step inside a patch, 1.04 on real images) from 1.24-1.26 to 1.09-1.17
  (mean 1.12 over five draws), at 0.995x the step speed; neither alone did as much. What was
  left came from the grid being the same at every sampler step, so every network call cuts the
  image with a randomly shifted grid (GRID_SHIFT='roll': the image rolled by 0-3 pixels as on
  a torus, windows and blocks wrapping, positions in image coordinates): seam ratio 1.03-1.04
  over three seeds, every class at 0.93 or more, at the same step speed (0.97x in one
  --compare). GRID_SHIFT='pad' (a canvas one patch larger) did as much for the seams (1.05-1.07)
  but at 0.66x the step: 64 tokens instead of 49.
  The DiT-T/4 of the earlier recipe (hidden 128, 1600 steps in about the same time, full
  guidance 1.5) reached class consistency 1.00-1.05x the judge's accuracy on real images with
  shirts or sandals at 0.82; this one 1.06-1.09x with every class at 0.93 or above (one run of
  the unrolled step, 2026-12-04: 1.065x, pullovers at 0.90). docs/RESULTS.md
  has the ablations, the measured numbers, wall times and the grid."""
  HIDDEN, DEPTH, HEADS = 96, 6, 4
  PATCH = 4
  GLOBAL_BATCH = 32
  LR = 2e-3
  WARMUP = 50
  NUM_STEPS = 3000
  EMA_DECAY = 0.99
  GRID_SHIFT = 'roll'
  # unrolled, nothing recomputed: 1.22x a step under TCMalloc (the docstring; 'full' and the
  # scan until 2026-12-04)
  SCAN_LAYERS = False
  REMAT = 'none'
  FUSED_QKV = True
  LOG_EVERY = 25
  EVAL_EVERY = 1500
  EVAL_BATCHES = 20
  SAMPLE_EVERY = 750
  CKPT_EVERY = 1500
  DENOISE_STEPS = 32
  CFG_SCALE = 3.0
  CFG_INTERVAL = (0.15, 0.8)
  EMBED_MARGIN = 2
  DECODER_OVERLAP = True
  SAMPLES_PER_CLASS = 8
  FID_NUM = 1000               # judged at the last step by the classifier below, when trained;
  FID_BATCH = 250              # 100 samples a class keep the per-class ratios within ~0.05
  JUDGE_EXP = 'ViT_T_FashionMNIST_Judge'
  JUDGE_DIR = 'workdirs/fmnist_judge'
  FD_NAME = 'fd_fmnist'


class DiT_T_FashionMNIST_Latent(DiT_T_FashionMNIST):
  """The main job on latents: DiT-T/1 on the 7x7x4 latents of a VAE trained here (the same 49
  tokens as DiT_T_FashionMNIST's 28x28 pixels in 4x4 patches). First `python tools/train_vae.py`
  (VAE_T_FashionMNIST, about 5 minutes on 2 CPU cores, written to workdirs/vae_t_fmnist/diffusers),
  then `python launch.py --exp=DiT_T_FashionMNIST_Latent --workdir=workdirs/dit_t_fmnist_latent`.
  Sample grids are decoded to pixels; docs/RESULTS.md compares it with the pixel run."""
  USE_VAE = True
  # the recipe its docs/RESULTS.md numbers were measured with; the pixel run's newer ones (LR
  # 2e-3, hidden 96, interval guidance) have not been tried on latents yet
  HIDDEN, DEPTH, HEADS = dit.SIZES['T']
  REMAT = 'none'
  FUSED_QKV = False
  EMBED_MARGIN = 0
  DECODER_OVERLAP = False
  GRID_SHIFT = 'none'     # a 1-token patch has no grid to shift
  CFG_SCALE = 1.5
  CFG_INTERVAL = (0.0, 1.0)
  FID_NUM = 500
  LR = 4e-4
  NUM_STEPS = 800
  EVAL_EVERY = 400
  CKPT_EVERY = 400
  SAMPLE_EVERY = 200
  VAE_PATH = 'workdirs/vae_t_fmnist/diffusers'
  VAE_HINT = 'python tools/train_vae.py trains it and writes it there (about 5 CPU minutes)'
  VAE_DOWNSAMPLE = 4
  LATENT_CHANNELS = 4
  PATCH = 1


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


class DiT_S_ImageNet256(AtScale, data.ImageNet256Data, DiT):
  """DiT-S/2 on ImageNet 256x256 as the paper trains it, on the 32x32x4 latents of the Stable
  Diffusion VAE (33M params). Prepare the data once with `python tools/build_dataset.py
  imagenet2012 --data_dir=D --source=M` (M holds ILSVRC2012_img_train.tar and
  ILSVRC2012_img_val.tar) and fetch the VAE on a machine that is online (`hf download
  stabilityai/sd-vae-ft-ema config.json diffusion_pytorch_model.safetensors --local-dir V`), then
  `python launch.py --exp=DiT_S_ImageNet256 --workdir=W --set DATA_DIR=D --set VAE_PATH=V`.
  Each step encodes its images (add `--set LATENTS_DIR=L` to read latents that
  tools/encode_latents.py stored once). Paper: FID-50K 68.4 after 400K steps of batch 256;
  `--set USE_VAE=False --set PATCH=16` trains on pixels at the same token count instead."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['S']
  USE_VAE = True
  PATCH = 2
  GLOBAL_BATCH = 256
  NUM_STEPS = 400_000
  LOG_EVERY = 100
  EVAL_EVERY = 10_000
  EVAL_BATCHES = 20
  CKPT_EVERY = 5_000
  DATA_WORKERS = 8
  # FID-10K at 100K-step intervals (each is 10K x DENOISE_STEPS x 2 forward passes); the
  # paper's FID-50K: --mode=sample --num_samples=50000, then tools/fid_stats.py
  FID_NUM = 10_000
  FID_EVERY = 100_000
  FID_BATCH = 500


class DiT_B_ImageNet256(DiT_S_ImageNet256):
  """DiT-B/2 on ImageNet 256 latents (130M params): `python launch.py --exp=DiT_B_ImageNet256
  --workdir=W --set DATA_DIR=D --set VAE_PATH=V` after preparing imagenet2012 and the VAE (see
  DiT_S_ImageNet256). Paper: FID-50K 43.5 after 400K steps; about 10 hours on one H200 for the
  DiT alone (scaled by FLOPs from DiT-XL's measured rate; in-step encoding adds to that, see
  docs/PERFORMANCE.md)."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['B']


class DiT_B_ImageNet(DiT_B_ImageNet256):
  """Same as DiT_B_ImageNet256, the name the docs use: `python launch.py --exp=DiT_B_ImageNet
  --workdir=W --set DATA_DIR=D --set VAE_PATH=V` (see DiT_S_ImageNet256)."""


class DiT_L_ImageNet256(DiT_S_ImageNet256):
  """DiT-L/2 on ImageNet 256 latents (458M params): `python launch.py --exp=DiT_L_ImageNet256
  --workdir=W --set DATA_DIR=D --set VAE_PATH=V` (see DiT_S_ImageNet256). Paper: FID-50K 23.3
  after 400K steps; about 33 hours on one H200 for the DiT alone (FLOPs estimate)."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['L']


class DiT_XL_ImageNet256(DiT_S_ImageNet256):
  """DiT-XL/2 on ImageNet 256 latents (675M params): `python launch.py --exp=DiT_XL_ImageNet256
  --workdir=W --set DATA_DIR=D --set VAE_PATH=V --set ATTENTION_IMPL=cudnn --set
  DTYPE=bfloat16` (see DiT_S_ImageNet256). Paper: FID-50K 19.5 after 400K steps (2.27 with CFG
  1.5 after 7M). One H200 ran the DiT's step at 588 images/s (docs/PERFORMANCE.md), so 400K
  steps of 256 take about 48 hours there, plus the encoding (or use LATENTS_DIR)."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['XL']


class DiT_B_Pixels256(AtScale, DiT, abstract=True):
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
  FID_NUM = 10_000             # against the statistics of the eval split (FID_REF to change)
  FID_EVERY = 50_000
  FID_BATCH = 250


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


class DiT_XL_Synthetic(AtScale, data.SyntheticImageData, DiT):
  """DiT-XL/2 at the ImageNet-256 latent shape on synthetic data, the speed benchmark's workload:
  `python tools/benchmark.py --exp=DiT_XL_Synthetic` (or `python launch.py
  --exp=DiT_XL_Synthetic --workdir=...`). One H200: 0.47 s per step of 256 at the defaults
  (cuDNN attention, 39% MFU; docs/PERFORMANCE.md)."""
  HIDDEN, DEPTH, HEADS = dit.SIZES['XL']
  IMAGE_SIZE = 32
  CHANNELS = 4
  NUM_CLASSES = 1000
  GLOBAL_BATCH = 256
