"""The FID network: InceptionV3 with the 2015-12-05 TensorFlow weights, pool3 features, in JAX.

    inception = FIDInception('weights/fid_inception_v3.npz')
    feats = jax.jit(inception.features)(params, images)   # [b, H, W, 1|3] in [0, 255] -> [b, 2048]

This is exactly pytorch-fid's `InceptionV3([3])` (use_fid_inception, resize_input and
normalize_input on), i.e. torchvision's inception_v3 layout with the FID variants of its blocks:
Mixed_5b-d, Mixed_6b-e and Mixed_7b average-pool without counting the padding (TensorFlow's
avg_pool), and Mixed_7c max-pools in its pool branch (as the 2015 TensorFlow graph of the
original FID code does, unlike the paper's InceptionV3). Each BasicConv2d is conv (no bias) +
BatchNorm (eps 0.001, running statistics) + ReLU; a global average pool after Mixed_7c gives the
2048 pool3 features. The classifier (fc) is not part of it. Module names mirror the torch keys
('Mixed_5b.branch1x1.conv.weight' is params['Mixed_5b']['branch1x1']['conv']['kernel'],
'...bn.running_mean' is [...]['bn']['mean']), so the conversion is a naming rule plus OIHW -> HWIO.

Input contract of `FIDInception.features` (and `preprocess`): NHWC pixels in [0, 255], uint8 or
float, any H and W, 1 channel (repeated to 3, for grayscale data such as Fashion-MNIST) or 3. They
are divided by 255, resized to 299x299 bilinearly as torch's F.interpolate(mode='bilinear',
align_corners=False) does, scaled to [-1, 1] and fed to the network; the output is float32.
The resize does NOT antialias, for up- or downsampling, because pytorch-fid does not: FID numbers
are only comparable with that choice. jax.image.resize(..., 'bilinear', antialias=False) agrees
with torch to 1.2e-7 on [0, 1] pixels for 28, 64, 320, 512, 598 and 300x700 inputs (its default,
antialias=True, differs by up to 0.52 when downsampling 512 -> 299).

Weights: pytorch-fid's port of the TensorFlow graph,
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
converted once, on a machine with torch, by

    python tools/convert_inception.py --pth=PATH/pt_inception-2015-12-05-6726825d.pth \\
        --out=weights/fid_inception_v3.npz

The weights file is one uncompressed .npz holding the torch state dict as NumPy arrays, in torch
layout and under torch's names (conv OIHW 'X.conv.weight'; 'X.bn.weight', 'X.bn.bias',
'X.bn.running_mean', 'X.bn.running_var'), without fc and num_batches_tracked: it reads without
torch or JAX, and `load` checks it with the same code that checks a torch state dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from layers.convolutions import Conv

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
DEFAULT_PATH = 'weights/fid_inception_v3.npz'
INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3   # TensorFlow's batch-norm epsilon in the 2015 graph, not torch's 1e-5

Padding = tuple[tuple[int, int], tuple[int, int]]


def convert_command(out: str = DEFAULT_PATH) -> str:
  """The command that writes the weights file `out` (run where torch is installed)."""
  return ('python tools/convert_inception.py '
          f'--pth=PATH/pt_inception-2015-12-05-6726825d.pth --out={out}')


# ---------------------------------------------------------------------------------- the network --

class BatchNorm(nn.Module):
  """Inference-mode BatchNorm over the last dim: (x - mean) / sqrt(var + eps) * scale + bias.
  The running statistics are frozen parameters here (the network is never trained)."""
  epsilon: float = BN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    param = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, ('conv_out',)), (c,), jnp.float32)
    scale = param('scale', nn.initializers.ones_init())
    bias = param('bias', nn.initializers.zeros_init())
    mean = param('mean', nn.initializers.zeros_init())
    var = param('var', nn.initializers.ones_init())
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((x.astype(jnp.float32) - mean) * mul + bias).astype(self.dtype)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm -> ReLU, torchvision's BasicConv2d."""
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv(self.features, self.kernel_size, self.strides, self.padding, use_bias=False,
             dtype=self.dtype, name='conv')(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x))


def _same(kh: int, kw: int) -> Padding:
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def _avg_pool_3x3(x):
  # TensorFlow's avg_pool divides by the count of real pixels under the window (the FID patch)
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_same(3, 3), count_include_pad=False)


def _max_pool_3x3(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=_same(3, 3))   # pads with -inf


def _branch(parent: nn.Module, features: int, kernel: tuple[int, int], name: str,
            stride: int = 1) -> 'BasicConv2d':
  """A block's BasicConv2d: 'same' padding at stride 1, none at stride 2 (the reductions)."""
  padding = _same(*kernel) if stride == 1 else ((0, 0), (0, 0))
  return BasicConv2d(features, kernel, (stride, stride), padding, dtype=parent.dtype,
                     parent=parent, name=name)


class InceptionA(nn.Module):
  """Mixed_5b-d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, name: _branch(self, f, k, name)
    b1 = conv(64, (1, 1), 'branch1x1')(x)
    b5 = conv(64, (5, 5), 'branch5x5_2')(conv(48, (1, 1), 'branch5x5_1')(x))
    b3 = conv(64, (1, 1), 'branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), 'branch3x3dbl_3')(conv(96, (3, 3), 'branch3x3dbl_2')(b3))
    bp = conv(self.pool_features, (1, 1), 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a, 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, name, s=1: _branch(self, f, k, name, s)
    b3 = conv(384, (3, 3), 'branch3x3', s=2)(x)
    bd = conv(96, (3, 3), 'branch3x3dbl_2')(conv(64, (1, 1), 'branch3x3dbl_1')(x))
    bd = conv(96, (3, 3), 'branch3x3dbl_3', s=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b-e (17x17), factorised 7x7s: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, name: _branch(self, f, k, name)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), 'branch1x1')(x)
    b7 = conv(c7, (1, 1), 'branch7x7_1')(x)
    b7 = conv(192, (7, 1), 'branch7x7_3')(conv(c7, (1, 7), 'branch7x7_2')(b7))
    bd = conv(c7, (1, 1), 'branch7x7dbl_1')(x)
    bd = conv(c7, (1, 7), 'branch7x7dbl_3')(conv(c7, (7, 1), 'branch7x7dbl_2')(bd))
    bd = conv(192, (1, 7), 'branch7x7dbl_5')(conv(c7, (7, 1), 'branch7x7dbl_4')(bd))
    bp = conv(192, (1, 1), 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a, 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, name, s=1: _branch(self, f, k, name, s)
    b3 = conv(320, (3, 3), 'branch3x3_2', s=2)(conv(192, (1, 1), 'branch3x3_1')(x))
    b7 = conv(192, (1, 1), 'branch7x7x3_1')(x)
    b7 = conv(192, (7, 1), 'branch7x7x3_3')(conv(192, (1, 7), 'branch7x7x3_2')(b7))
    b7 = conv(192, (3, 3), 'branch7x7x3_4', s=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b-c (8x8), split 3x3s: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. The pool
  is an average for Mixed_7b and a max for Mixed_7c, as in the FID graph."""
  max_pool: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, name: _branch(self, f, k, name)
    b1 = conv(320, (1, 1), 'branch1x1')(x)
    b3 = conv(384, (1, 1), 'branch3x3_1')(x)
    b3 = [conv(384, (1, 3), 'branch3x3_2a')(b3), conv(384, (3, 1), 'branch3x3_2b')(b3)]
    bd = conv(384, (3, 3), 'branch3x3dbl_2')(conv(448, (1, 1), 'branch3x3dbl_1')(x))
    bd = [conv(384, (1, 3), 'branch3x3dbl_3a')(bd), conv(384, (3, 1), 'branch3x3dbl_3b')(bd)]
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    bp = conv(192, (1, 1), 'branch_pool')(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """[b, 299, 299, 3] in [-1, 1] -> pool3 features [b, 2048] float32."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dt = self.dtype
    x = BasicConv2d(32, (3, 3), (2, 2), dtype=dt, name='Conv2d_1a_3x3')(x)        # 149
    x = BasicConv2d(32, (3, 3), dtype=dt, name='Conv2d_2a_3x3')(x)                # 147
    x = BasicConv2d(64, (3, 3), padding=_same(3, 3), dtype=dt, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)                                                        # 73
    x = BasicConv2d(80, (1, 1), dtype=dt, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, (3, 3), dtype=dt, name='Conv2d_4a_3x3')(x)               # 71
    x = _max_pool_3x3_s2(x)                                                        # 35
    x = InceptionA(32, dt, name='Mixed_5b')(x)                                     # 256 ch
    x = InceptionA(64, dt, name='Mixed_5c')(x)                                     # 288
    x = InceptionA(64, dt, name='Mixed_5d')(x)                                     # 288
    x = InceptionB(dt, name='Mixed_6a')(x)                                         # 17, 768
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, dt, name=name)(x)
    x = InceptionD(dt, name='Mixed_7a')(x)                                         # 8, 1280
    x = InceptionE(False, dt, name='Mixed_7b')(x)                                  # 2048
    x = InceptionE(True, dt, name='Mixed_7c')(x)
    return x.astype(jnp.float32).mean(axis=(1, 2))                                 # [b, 2048]


def preprocess(images) -> jax.Array:
  """[b, H, W, 1|3] pixels in [0, 255] -> the network's input [b, 299, 299, 3] in [-1, 1]
  (pytorch-fid's resize_input + normalize_input; see the module docstring)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'FID Inception takes NHWC images with 1 or 3 channels, got shape '
                     f'{tuple(images.shape)}')
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, h, w, c = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, c), 'bilinear', antialias=False)
  return 2.0 * x - 1.0


def abstract_params(model: InceptionV3 | None = None):
  """The params tree as ShapeDtypeStructs, still boxed with logical names."""
  model = model or InceptionV3()
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)['params']


# ------------------------------------------------------------------------ the torch state dict --

_BN_NAMES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def torch_key(path: tuple[str, ...]) -> str:
  """('Mixed_5b', 'branch1x1', 'bn', 'mean') -> 'Mixed_5b.branch1x1.bn.running_mean'."""
  *modules, leaf = path
  return '.'.join(modules + ['weight' if leaf == 'kernel' else _BN_NAMES[leaf]])


def _ignored(key: str) -> bool:
  # the classifier is not part of the FID network; BN's step counter is not a weight
  return key.startswith('fc.') or key.endswith('num_batches_tracked')


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """Our float32 params (nested dict of NumPy arrays) from pytorch-fid's FID Inception state dict
  (NumPy arrays or CPU tensors). Raises one ValueError listing every parameter with no tensor,
  every tensor of the wrong shape and every tensor that nothing read."""
  used, missing, wrong = set(), [], []

  def convert(path, leaf):
    key = torch_key(tuple(p.key for p in path))
    if key not in state_dict:
      missing.append(key)
      return None
    used.add(key)
    value = np.asarray(state_dict[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)   # OIHW -> HWIO
    if value.shape != tuple(leaf.shape):
      wrong.append(f'{key}: {tuple(np.shape(state_dict[key]))} gives {value.shape}, expected '
                   f'{tuple(leaf.shape)}')
      return None
    return np.ascontiguousarray(value)

  params = jax.tree_util.tree_map_with_path(convert, nn.unbox(abstract_params()))
  unused = sorted(k for k in state_dict if k not in used and not _ignored(k))
  if missing or wrong or unused:
    lines = ([f'missing ({len(missing)}): ' + ', '.join(missing)] if missing else []) + \
            ([f'wrong shape ({len(wrong)}): ' + '; '.join(wrong)] if wrong else []) + \
            ([f'unused ({len(unused)}): ' + ', '.join(unused)] if unused else [])
    raise ValueError('FID Inception weights do not match the network:\n  ' + '\n  '.join(lines))
  return params


def params_to_torch(params) -> dict[str, np.ndarray]:
  """The inverse of params_from_torch: torch names and layout, float32."""
  out = {}
  for path, v in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
    v = np.asarray(v, np.float32)
    out[torch_key(tuple(p.key for p in path))] = np.ascontiguousarray(
        v.transpose(3, 2, 0, 1) if v.ndim == 4 else v)
  return out


def save(params, path: str) -> None:
  """Write the weights file (format in the module docstring)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, 'wb') as f:   # a file object, so np.savez does not append '.npz' to `path`
    np.savez(f, **params_to_torch(params))


def _missing_message(path: str) -> str:
  return (f'no FID Inception weights file {path}. Download pt_inception-2015-12-05-6726825d.pth '
          f"(pytorch-fid's GitHub release 'fid_weights': {FID_WEIGHTS_URL}) and convert it on "
          f'a machine with torch: {convert_command(path)}')


def load(path: str) -> dict:
  """The weights file -> params (nested dict of float32 NumPy arrays), checked like a state dict."""
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_message(path))
  with np.load(path, allow_pickle=False) as npz:
    return params_from_torch({k: npz[k] for k in npz.files})


# ----------------------------------------------------------------- the trainer's FID network --

class FIDInception:
  """The frozen FID feature extractor. The weights are loaded once, on the host, as NumPy arrays
  (`params`); the trainer places them on the mesh (trainer.state.place_frozen) and passes them to
  `features` inside jit."""

  def __init__(self, path: str):
    self.path = path
    self.model = InceptionV3()
    self.params = load(path)

  @classmethod
  def random(cls, seed: int = 0) -> 'FIDInception':
    """Random weights (for tests and timing): He-normal kernels, BN scale near 1 and bias near 0,
    mean 0 and var 1. Drawn with NumPy from the shapes, since jitting `init` would compile the
    whole network once more."""
    self = cls.__new__(cls)
    self.path = f'<random seed={seed}>'
    self.model = InceptionV3()
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
      name = path[-1].key
      if name == 'kernel':
        fan_in = int(np.prod(leaf.shape[:3]))
        return rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
      base = {'scale': 1.0, 'bias': 0.0, 'mean': 0.0, 'var': 1.0}[name]
      if name in ('scale', 'bias'):
        return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
      return np.full(leaf.shape, base, np.float32)

    self.params = jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(self.model)))
    return self

  def abstract_params(self):
    return abstract_params(self.model)

  def features(self, params, images) -> jax.Array:
    """[b, H, W, 1|3] pixels in [0, 255] (uint8 or float) -> pool3 features [b, 2048] float32."""
    return self.model.apply({'params': params}, preprocess(images))


def num_params(params) -> int:
  return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(nn.unbox(params)))
