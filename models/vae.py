"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in JAX, and its diffusers-format loader.

    model, params = vae.from_pretrained('stabilityai/sd-vae-ft-ema')    # or a local directory
    mean, logvar = model.apply({'params': params}, images, method='encode')   # [b, H/8, W/8, 4]
    images = model.apply({'params': params}, latents, method='decode')        # [b, H, W, 3]

Images are NHWC in [-1, 1]. The architecture follows diffusers' `config.json` (Encoder ->
quant_conv -> diagonal Gaussian posterior; post_quant_conv -> Decoder): ResNet blocks of
GroupNorm/SiLU/3x3 conv, a single-head self-attention in the middle block, stride-2 downsampling
(padded one pixel right and bottom) and nearest-neighbour 2x upsampling. Module names mirror
diffusers' keys with their dots made underscores (encoder.down_blocks.0.resnets.1.conv1.weight
is params['encoder']['down_blocks_0_resnets_1']['conv1']['kernel']), so the conversion below is
one naming rule plus the layout changes, both ways.

Latent scaling is the caller's (see `PretrainedVAE`): the DiT sees
(z - shift_factor) * scaling_factor, z a posterior sample.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from layers.convolutions import Conv
from layers.linears import Dense
from layers.normalizations import GroupNorm

log = logging.getLogger(__name__)

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
DIFFUSERS_VERSION = '0.42.1'    # written into the config.json we save, as diffusers does
LOGVAR_RANGE = (-30.0, 20.0)     # diffusers clamps the posterior's log-variance to this range

DOWN_BLOCK = 'DownEncoderBlock2D'
UP_BLOCK = 'UpDecoderBlock2D'
# diffusers' get_activation names; its GELU is torch's exact (erf) one
ACTIVATIONS = {'silu': nn.silu, 'swish': nn.silu, 'relu': nn.relu,
               'mish': lambda x: x * jnp.tanh(nn.softplus(x)),
               'gelu': lambda x: nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKL config.json (its defaults where a field is absent)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
  up_block_types: tuple[str, ...] = (UP_BLOCK,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    levels = len(self.block_out_channels)
    if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
      raise ValueError(f'VAE config: {len(self.down_block_types)} down and '
                       f'{len(self.up_block_types)} up block types for {levels} '
                       f'block_out_channels; diffusers needs one of each per level')
    bad = sorted({t for t in self.down_block_types if t != DOWN_BLOCK} |
                 {t for t in self.up_block_types if t != UP_BLOCK})
    if bad:
      raise ValueError(f'VAE config: unsupported block types {bad}; models/vae.py implements '
                       f'AutoencoderKL with {DOWN_BLOCK} and {UP_BLOCK} only')
    if self.act_fn not in ACTIVATIONS:
      raise ValueError(f'VAE config: act_fn={self.act_fn!r} is not one of {sorted(ACTIVATIONS)}')
    odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if odd:
      raise ValueError(f'VAE config: block_out_channels {odd} are not divisible by '
                       f'norm_num_groups={self.norm_num_groups}')

  @property
  def downsample(self) -> int:
    """Image size / latent size."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'VAEConfig':
    d = dict(d)
    name = d.pop('_class_name', 'AutoencoderKL')
    if name != 'AutoencoderKL':
      raise ValueError(f'VAE config: _class_name is {name!r}; models/vae.py reads AutoencoderKL')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in fields and not k.startswith('_'))
    if unknown:  # a later diffusers may add fields; they cannot change the tensors we check
      log.warning('VAE config: ignoring fields %s', unknown)
    kw = {k: v for k, v in d.items() if k in fields}
    for k in ('down_block_types', 'up_block_types', 'block_out_channels', 'latents_mean',
              'latents_std'):
      if kw.get(k) is not None:
        kw[k] = tuple(kw[k])
    if isinstance(kw.get('sample_size'), (list, tuple)):
      kw['sample_size'] = int(kw['sample_size'][0])
    return cls(**kw)

  def to_dict(self) -> dict:
    d = {'_class_name': 'AutoencoderKL', '_diffusers_version': DIFFUSERS_VERSION}
    for k, v in dataclasses.asdict(self).items():
      d[k] = list(v) if isinstance(v, tuple) else v
    return d


# ---------------------------------------------------------------------------------- the network --

class ResnetBlock(nn.Module):
  """x + conv(act(norm(conv(act(norm(x)))))), with a 1x1 conv on the skip when channels change."""
  features: int
  groups: int
  act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS[self.act]
    h = act(GroupNorm(self.groups, 1e-6, name='norm1', dtype=self.dtype)(x))
    h = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name='conv1', dtype=self.dtype)(h)
    h = act(GroupNorm(self.groups, 1e-6, name='norm2', dtype=self.dtype)(h))
    h = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name='conv2', dtype=self.dtype)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), padding='VALID', name='conv_shortcut', dtype=self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over the H*W positions after a GroupNorm, added to its input."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = GroupNorm(self.groups, 1e-6, name='group_norm', dtype=self.dtype)(x)
    h = h.reshape(b, height * width, c)
    q, k, v = (Dense(c, kernel_axes=('conv_in', 'conv_out'), dtype=self.dtype, name=name)(h)
               for name in ('to_q', 'to_k', 'to_v'))
    logits = jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32) / np.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bqk,bkc->bqc', weights, v)
    out = Dense(c, kernel_axes=('conv_in', 'conv_out'), dtype=self.dtype, name='to_out_0')(out)
    return x + out.reshape(b, height, width, c).astype(x.dtype)


class MidBlock(nn.Module):
  """resnet, (attention, resnet): the bottleneck of both encoder and decoder."""
  groups: int
  act: str
  attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.act, self.dtype, name='resnets_0')(x)
    if self.attention:
      x = Attention(self.groups, self.dtype, name='attentions_0')(x)
    return ResnetBlock(c, self.groups, self.act, self.dtype, name='resnets_1')(x)


class Encoder(nn.Module):
  """[b, H, W, in] -> [b, H/f, W/f, 2 * latent]: the posterior's mean and log-variance."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.config, self.dtype
    groups, act = cfg.norm_num_groups, cfg.act_fn
    x = Conv(cfg.block_out_channels[0], padding=((1, 1), (1, 1)), name='conv_in', dtype=dt)(x)
    for i, features in enumerate(cfg.block_out_channels):
      block = f'down_blocks_{i}'
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(features, groups, act, dt, name=f'{block}_resnets_{j}')(x)
      if i < len(cfg.block_out_channels) - 1:
        # diffusers pads (0, 1, 0, 1) before its unpadded stride-2 conv
        x = Conv(features, strides=(2, 2), padding=((0, 1), (0, 1)),
                 name=f'{block}_downsamplers_0_conv', dtype=dt)(x)
    x = MidBlock(groups, act, cfg.mid_block_add_attention, dt, name='mid_block')(x)
    x = ACTIVATIONS[act](GroupNorm(groups, 1e-6, name='conv_norm_out', dtype=dt)(x))
    return Conv(2 * cfg.latent_channels, padding=((1, 1), (1, 1)), name='conv_out', dtype=dt)(x)


class Decoder(nn.Module):
  """[b, h, w, latent] -> [b, h*f, w*f, out]."""
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, dt = self.config, self.dtype
    groups, act = cfg.norm_num_groups, cfg.act_fn
    channels = tuple(reversed(cfg.block_out_channels))
    x = Conv(channels[0], padding=((1, 1), (1, 1)), name='conv_in', dtype=dt)(z)
    x = MidBlock(groups, act, cfg.mid_block_add_attention, dt, name='mid_block')(x)
    for i, features in enumerate(channels):
      block = f'up_blocks_{i}'
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(features, groups, act, dt, name=f'{block}_resnets_{j}')(x)
      if i < len(channels) - 1:
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        x = Conv(features, padding=((1, 1), (1, 1)), name=f'{block}_upsamplers_0_conv',
                 dtype=dt)(x)
    x = ACTIVATIONS[act](GroupNorm(groups, 1e-6, name='conv_norm_out', dtype=dt)(x))
    return Conv(cfg.out_channels, padding=((1, 1), (1, 1)), name='conv_out', dtype=dt)(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL: `encode` images to the posterior (mean, logvar), `decode` latents.

  Calling the module reconstructs from the posterior mean (what `init` traces).
  """
  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = Conv(2 * cfg.latent_channels, (1, 1), padding='VALID', dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = Conv(cfg.latent_channels, (1, 1), padding='VALID', dtype=self.dtype)

  def encode(self, x):
    """[b, H, W, in] in [-1, 1] -> mean, logvar, each float32 [b, H/f, W/f, latent]."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """[b, h, w, latent] (unscaled) -> images [b, h*f, w*f, out], roughly in [-1, 1]."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x)[0])


def sample_posterior(mean, logvar, rng):
  """z ~ N(mean, exp(logvar)), the posterior sample diffusers' latent_dist.sample() draws."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over every dim but the first (diffusers'
  DiagonalGaussianDistribution.kl())."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.sum(axis=tuple(range(1, mean.ndim)))


def abstract_params(model: AutoencoderKL, image_size: int | None = None):
  """The params tree as ShapeDtypeStructs, still boxed with logical names."""
  size = image_size or model.config.downsample * 4
  x = jax.ShapeDtypeStruct((1, size, size, model.config.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)['params']


# -------------------------------------------------------------- diffusers' checkpoint layout --

# pre-0.14 diffusers (and checkpoints saved by it) named the attention projections differently
_OLD_ATTENTION_NAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def diffusers_key(path: tuple[str, ...]) -> str:
  """('encoder', 'down_blocks_0_resnets_1', 'conv1', 'kernel') -> the safetensors key."""
  *modules, leaf = path
  parts = [re.sub(r'_(\d+)(_|$)', lambda m: f'.{m[1]}{"." if m[2] else ""}', m)
           for m in modules]
  return '.'.join(parts + ['bias' if leaf == 'bias' else 'weight'])


def _old_key(key: str) -> str | None:
  for new, old in _OLD_ATTENTION_NAMES.items():
    if f'.{new}.' in key:
      return key.replace(f'.{new}.', f'.{old}.')
  return None


def _from_torch(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A torch tensor's layout -> ours: conv OIHW -> HWIO, Linear [out, in] -> [in, out]; attention
  projections stored as 1x1 convs ([out, in, 1, 1]) by old checkpoints become Linear ones."""
  if len(shape) == 4:
    value = value.transpose(2, 3, 1, 0)
  elif len(shape) == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0]
    value = value.T
  return value


def _to_torch(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T
  return value


def params_from_diffusers(model: AutoencoderKL, tensors: Mapping[str, np.ndarray]) -> dict:
  """Our float32 params tree from a diffusers state dict (numpy arrays). Raises one ValueError
  listing every parameter with no tensor, every tensor of the wrong shape, and every tensor
  that nothing read."""
  boxed = abstract_params(model)
  used, missing, wrong = set(), [], []

  def convert(path, leaf):
    names = tuple(p.key for p in path)
    key = diffusers_key(names)
    old = _old_key(key)
    if key not in tensors and old in tensors:
      key = old
    if key not in tensors:
      missing.append(key)
      return None
    used.add(key)
    value = _from_torch(np.asarray(tensors[key], np.float32), leaf.shape)
    if value.shape != tuple(leaf.shape):
      wrong.append(f'{key}: {tuple(tensors[key].shape)} gives {value.shape}, expected '
                   f'{tuple(leaf.shape)}')
      return None
    return value

  params = jax.tree_util.tree_map_with_path(convert, nn.unbox(boxed))
  unused = sorted(set(tensors) - used)
  if missing or wrong or unused:
    lines = ([f'missing ({len(missing)}): ' + ', '.join(missing)] if missing else []) + \
            ([f'wrong shape ({len(wrong)}): ' + '; '.join(wrong)] if wrong else []) + \
            ([f'unused ({len(unused)}): ' + ', '.join(unused)] if unused else [])
    raise ValueError('VAE weights do not match the config:\n  ' + '\n  '.join(lines))
  return params


def params_to_diffusers(params) -> dict[str, np.ndarray]:
  """The inverse of params_from_diffusers: a state dict diffusers' AutoencoderKL loads."""
  flat = jax.tree_util.tree_leaves_with_path(nn.unbox(params))
  return {diffusers_key(tuple(p.key for p in path)):
          np.ascontiguousarray(_to_torch(np.asarray(v, np.float32))) for path, v in flat}


# ------------------------------------------------------------------ loading and saving ---------

def _hub_hint(hub_id: str) -> str:
  return (f'On a machine that is online, fetch it with `hf download {hub_id} {CONFIG_NAME} '
          f'{WEIGHTS_NAME} --local-dir DIR` (huggingface_hub; older releases call the command '
          f'huggingface-cli), copy DIR here and point VAE_PATH at it')


def resolve(path_or_hub_id: str) -> str:
  """The local directory holding config.json and the safetensors weights: `path_or_hub_id`
  itself when it is a directory, else the Hugging Face cache's copy of that hub id (downloaded
  first where the network answers and HF_HUB_OFFLINE is not set)."""
  path = os.path.expanduser(str(path_or_hub_id))
  if os.path.isdir(path):
    absent = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, n))]
    if absent:
      raise FileNotFoundError(f'VAE directory {path} has no {" or ".join(absent)}; it needs '
                              f'the diffusers layout ({CONFIG_NAME} + {WEIGHTS_NAME})')
    return path
  if not re.fullmatch(r'[\w.-]+/[\w.-]+', path) or os.path.exists(path):
    raise FileNotFoundError(f'no VAE directory {path}: give a directory with {CONFIG_NAME} and '
                            f'{WEIGHTS_NAME}, or a Hugging Face hub id such as '
                            'stabilityai/sd-vae-ft-ema')
  import huggingface_hub
  from huggingface_hub import constants
  patterns = [CONFIG_NAME, WEIGHTS_NAME]
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=patterns, local_files_only=True)
  except Exception:  # not cached: try the network below
    pass
  reason = 'HF_HUB_OFFLINE is set'
  if not constants.HF_HUB_OFFLINE:
    try:
      return huggingface_hub.snapshot_download(path, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:
      reason = f'download failed: {type(e).__name__}'
  raise FileNotFoundError(
      f'VAE {path!r} is not a local directory and not in the Hugging Face cache '
      f'{constants.HF_HUB_CACHE} ({reason}). {_hub_hint(path)}.')


def _load(path_or_hub_id: str, dtype) -> tuple[AutoencoderKL, dict]:
  """(model, params as host NumPy arrays)."""
  from safetensors.numpy import load_file
  directory = resolve(path_or_hub_id)
  with open(os.path.join(directory, CONFIG_NAME)) as f:
    config = VAEConfig.from_dict(json.load(f))
  model = AutoencoderKL(config, jnp.dtype(dtype))
  return model, params_from_diffusers(model, load_file(os.path.join(directory, WEIGHTS_NAME)))


def from_pretrained(path_or_hub_id: str, dtype=jnp.float32) -> tuple[AutoencoderKL, dict]:
  """(model, params) from a diffusers AutoencoderKL directory or hub id. `dtype` is the compute
  dtype; parameters are float32 (GroupNorm statistics are always float32)."""
  model, params = _load(path_or_hub_id, dtype)
  return model, jax.tree.map(jnp.asarray, params)


def save_pretrained(directory: str, config: VAEConfig, params) -> None:
  """Write `directory`/config.json + diffusion_pytorch_model.safetensors, the files diffusers'
  AutoencoderKL.from_pretrained (and `from_pretrained` here) read."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  save_file(params_to_diffusers(params), os.path.join(directory, WEIGHTS_NAME),
            metadata={'format': 'pt'})
  with open(os.path.join(directory, CONFIG_NAME), 'w') as f:
    json.dump(config.to_dict(), f, indent=2)


# ------------------------------------------------------------- the frozen codec of a latent DiT --

class PretrainedVAE:
  """A frozen VAE between a DiT and its images: `prepare` turns a batch of images (or of
  pre-encoded posterior moments) into scaled latents, `decode` turns sampled latents back into
  images. The parameters are loaded once at construction, on the host; the trainer places them
  on the mesh (by their logical names) and passes them to these functions inside jit.

  `downsample` and `latent_channels` are what the experiment was configured for; a checkpoint
  that disagrees is rejected here rather than failing later inside the model.
  """

  def __init__(self, path: str, dtype='float32', downsample: int = 8, latent_channels: int = 4,
               missing_hint: str = ''):
    self.path = path
    try:
      # kept on the host: the trainer places them on the mesh itself (trainer.state.place_frozen)
      self.model, self.params = _load(path, dtype)
    except FileNotFoundError as e:
      if not missing_hint:
        raise
      raise FileNotFoundError(f'{e} ({missing_hint})') from None
    cfg = self.model.config
    if (cfg.downsample, cfg.latent_channels) != (downsample, latent_channels):
      raise ValueError(f'the VAE at {path} downsamples by {cfg.downsample} to '
                       f'{cfg.latent_channels} latent channels, but the experiment expects '
                       f'VAE_DOWNSAMPLE={downsample} and LATENT_CHANNELS={latent_channels}; '
                       'set those knobs to match the VAE')
    self._set_scaling()

  @classmethod
  def random(cls, config: VAEConfig, dtype='float32', seed: int = 0) -> 'PretrainedVAE':
    """Random weights of `config`'s architecture: for timing, where the weights do not matter."""
    self = cls.__new__(cls)
    self.path = f'<random {config.block_out_channels}>'
    self.model = AutoencoderKL(config, jnp.dtype(dtype))
    size = config.downsample * 4
    self.params = nn.unbox(jax.jit(self.model.init)(  # eager init takes minutes op by op
        jax.random.key(seed), jnp.zeros((1, size, size, config.in_channels))))
    self.params = self.params['params']
    self._set_scaling()
    return self

  def _set_scaling(self):
    cfg = self.model.config
    self.scaling_factor = float(cfg.scaling_factor)
    self.shift_factor = float(cfg.shift_factor or 0.0)

  def abstract_params(self):
    return abstract_params(self.model)

  def encode(self, params, images):
    """Images -> (mean, logvar) of the posterior, unscaled."""
    return self.model.apply({'params': params}, images, method='encode')

  def prepare(self, params, batch: dict, rng) -> dict:
    """The batch with 'image' replaced by scaled latents: a posterior sample drawn with `rng`
    from the VAE's encoding of 'image', or from 'moments' (mean and logvar concatenated on the
    channel dim, as tools/encode_latents.py stores them)."""
    batch = dict(batch)
    if 'moments' in batch:
      mean, logvar = jnp.split(batch.pop('moments').astype(jnp.float32), 2, axis=-1)
    else:
      mean, logvar = self.encode(params, batch['image'])
    z = sample_posterior(mean, logvar, rng)
    batch['image'] = (z - self.shift_factor) * self.scaling_factor
    return batch

  def decode(self, params, latents):
    """Scaled latents -> images in about [-1, 1], float32."""
    z = latents / self.scaling_factor + self.shift_factor
    return self.model.apply({'params': params}, z, method='decode').astype(jnp.float32)


# The architecture of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (their config.json): 83.7M
# parameters, 256x256x3 images to 32x32x4 latents.
SD_VAE_CONFIG = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                          down_block_types=(DOWN_BLOCK,) * 4, up_block_types=(UP_BLOCK,) * 4,
                          latent_channels=4, norm_num_groups=32, sample_size=256,
                          scaling_factor=0.18215)
