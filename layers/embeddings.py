"""Token, position, patch and timestep embeddings, and fixed sin-cos tables."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from layers.convolutions import Conv
from layers.linears import Dense
from layers.mlps import gelu_tanh


def sincos_frequencies(dim: int, max_period: float = 10000.0) -> np.ndarray:
  """[dim / 2] float64: the frequencies 1 / max_period^(2i/dim) of a dim-channel sin-cos table."""
  if dim % 2:
    raise ValueError(f'sin-cos embedding dim {dim} must be even')
  return 1.0 / max_period ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))


def sincos_1d(dim: int, positions: np.ndarray, max_period: float = 10000.0) -> np.ndarray:
  """[len(positions), dim]: first half sin, second half cos, frequencies 1 / max_period^(2i/dim)."""
  omega = sincos_frequencies(dim, max_period)
  angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
  """[grid_size**2, dim] row-major over (row, col): half the channels encode the column, half the row.

  The same layout as the MAE/DiT reference tables, so published DiT weights line up.
  """
  if dim % 4:
    raise ValueError(f'2D sin-cos embedding dim {dim} must be divisible by 4')
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')
  return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def sincos_2d_offset(dim: int, grid_size: int, offset: jax.Array) -> jax.Array:
  """[b, grid_size**2, dim]: `sincos_2d`'s table for cells whose (row, col) positions are moved
  by offset [b, 2] (fractions of a cell: the grid of cell i lies at i + offset), one per example.
  Offset 0 gives `sincos_2d` row for row."""
  if dim % 4:
    raise ValueError(f'2D sin-cos embedding dim {dim} must be divisible by 4')
  omega = jnp.asarray(sincos_frequencies(dim // 2), jnp.float32)
  cells = jnp.arange(grid_size, dtype=jnp.float32)
  rows = cells[None, :, None] + offset[:, 0, None, None].astype(jnp.float32)   # [b, g, 1]
  cols = cells[None, None, :] + offset[:, 1, None, None].astype(jnp.float32)   # [b, 1, g]
  rows, cols = jnp.broadcast_arrays(rows, cols)
  b = offset.shape[0]

  def table(pos):                                      # [b, g, g] -> [b, g*g, dim/2]
    angles = pos.reshape(b, -1, 1) * omega
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  return jnp.concatenate([table(cols), table(rows)], axis=-1)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[b] -> [b, dim] sinusoidal features of (possibly fractional) timesteps; cos half first."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Embed(nn.Module):
  """Lookup table [v, d] ('vocab', 'embed'); `attend` reuses it as a tied output projection."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                  ('vocab', 'embed')),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """[..., d] -> [..., v] logits against the table."""
    return jnp.einsum('...d,vd->...v', x, self.embedding.astype(self.dtype))


class PositionEmbed(nn.Module):
  """Learned absolute positions [max_len, d] ('pos', 'embed')."""
  max_len: int
  features: int
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, positions: jax.Array) -> jax.Array:
    table = self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(self.init_std), ('pos', 'embed')),
        (self.max_len, self.features), jnp.float32)
    return jnp.take(table, positions, axis=0).astype(self.dtype)


def patchify(x: jax.Array, patch: int) -> jax.Array:
  """[b, H, W, c] -> [b, (H/p)(W/p), p*p*c], patches row-major, pixels (row, col, channel)."""
  b, hh, ww, c = x.shape
  if hh % patch or ww % patch:
    raise ValueError(f'image size {hh}x{ww} is not divisible by patch size {patch}')
  x = x.reshape(b, hh // patch, patch, ww // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (hh // patch) * (ww // patch), patch * patch * c)


def unpatchify(x: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """Inverse of `patchify`: [b, (H/p)(W/p), p*p*c] -> [b, H, W, c]."""
  b, _, ppc = x.shape
  c = ppc // (patch * patch)
  x = x.reshape(b, height // patch, width // patch, patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def unpatchify_overlapping(x: jax.Array, patch: int, height: int, width: int,
                           wrap: bool = False) -> jax.Array:
  """[b, (H/p)(W/p), (2p)(2p)c] -> [b, H, W, c]: each token's 2p x 2p block centred on its own
  p x p cell (reaching p/2 into each neighbour), blocks summed where they overlap, the p/2 margin
  around the image dropped (with `wrap`, added to the opposite side: the image is a torus). The
  adjoint of a 2p x 2p convolution of stride p with p/2 padding (circular with `wrap`): every
  pixel is a sum over the tokens of up to four cells, so no pixel pair straddling a cell border
  is decoded by one token alone. `patch` must be even."""
  if patch % 2:
    raise ValueError(f'overlapping patches need an even patch size, got {patch}')
  b, _, qqc = x.shape
  gh, gw, c = height // patch, width // patch, qqc // (4 * patch * patch)
  x = x.reshape(b, gh, gw, 2, patch, 2, patch, c)
  m = patch // 2
  canvas = 0
  for qi in (0, 1):          # the block's quadrants land on the cell and its neighbours
    for qj in (0, 1):
      quad = x[:, :, :, qi, :, qj].transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)
      if wrap:
        canvas = canvas + jnp.roll(quad, (qi * patch - m, qj * patch - m), axis=(1, 2))
      else:
        canvas = canvas + jnp.pad(quad, ((0, 0), (qi * patch, (1 - qi) * patch),
                                         (qj * patch, (1 - qj) * patch), (0, 0)))
  return canvas if wrap else canvas[:, m:m + height, m:m + width]


def patchify_overlapping(x: jax.Array, patch: int, margin: int,
                         wrap: bool = False) -> jax.Array:
  """[b, H, W, c] -> [b, (H/p)(W/p), w*w*c] with w = p + 2 * margin: each token's w x w window
  centred on its own p x p cell (reaching `margin` pixels into each neighbour, zeros beyond the
  image, or with `wrap` the opposite side's pixels), pixels row-major over the window. The
  input of a w x w convolution of stride p with `margin` padding (circular with `wrap`); margin
  p/2 makes it the adjoint of `unpatchify_overlapping` with the same `wrap`."""
  b, hh, ww, c = x.shape
  if hh % patch or ww % patch:
    raise ValueError(f'image size {hh}x{ww} is not divisible by patch size {patch}')
  if not 0 <= margin <= min(hh, ww):
    raise ValueError(f'patch margin {margin} must be in [0, {min(hh, ww)}] for {hh}x{ww} images')
  gh, gw, w = hh // patch, ww // patch, patch + 2 * margin
  padded = jnp.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0)),
                   mode='wrap' if wrap else 'constant')
  # strided slices, one per window row and then per window column: 2w slices instead of a gather
  rows = jnp.stack([padded[:, u:u + gh * patch:patch] for u in range(w)], axis=2)
  win = jnp.stack([rows[:, :, :, v:v + gw * patch:patch] for v in range(w)], axis=4)
  return win.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, w * w * c)   # [b, gh, gw, w, w, c]


class PatchEmbed(nn.Module):
  """A stride-p, p x p convolution, computed as patchify + one matmul ('patch', 'embed').

  The kernel is the conv kernel [p, p, c, d] flattened row-major to [p*p*c, d]. With a
  `margin` the window grows by that many pixels on each side, still centred on the patch
  (`patchify_overlapping`), so pixel pairs across a patch border are seen together by both
  tokens and not only through attention. With `wrap` the windows at the border reach around to
  the opposite side (the image taken as a torus) instead of into zeros.
  """
  patch: int
  features: int
  dtype: jnp.dtype = jnp.float32
  margin: int = 0
  wrap: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.margin:
      patches = patchify_overlapping(x, self.patch, self.margin, self.wrap)  # [b, l, w*w*c]
    else:
      patches = patchify(x, self.patch)                                     # [b, l, p*p*c]
    return Dense(self.features, ('patch', 'embed'), dtype=self.dtype, name='proj')(patches)


def stem_strides(patch: int) -> int:
  """The number of stride-2 convolutions whose token grid matches a patch of `patch` pixels:
  ceil(log2 p), so p = 16 gives 4 (224 px -> 14 x 14) and p = 7 gives 3 (28 px -> 4 x 4)."""
  return max(1, math.ceil(math.log2(patch)))


class ConvStem(nn.Module):
  """Patchify by `stem_strides(patch)` 3x3 stride-2 convolutions (GELU after each) and a 1x1
  projection to `features`: [b, H, W, c] -> [b, l, features], tokens row-major.

  Xiao et al. 2021 ("Early convolutions help transformers see better") replace ViT's single
  p x p patchify with such a stack at about the same cost and report faster, more stable
  optimisation. Channels double per convolution and the last one has `features / 2`; the grid
  is ceil(H / 2^n) per side (SAME padding): H / p for a power-of-two p (and for p = 7 at 28 px);
  models.vit refuses a grid that differs from the patches'.
  """
  patch: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n = stem_strides(self.patch)
    h = x.astype(self.dtype)
    for i in range(n):
      width = max(8, self.features >> (n - i))
      h = gelu_tanh(Conv(width, (3, 3), (2, 2), dtype=self.dtype, name=f'conv{i}')(h))
    b, gh, gw, c = h.shape
    return Dense(self.features, ('conv_in', 'embed'), dtype=self.dtype, name='proj')(
        h.reshape(b, gh * gw, c))


class TimestepEmbed(nn.Module):
  """Scalar timestep -> sinusoidal features -> Dense -> SiLU -> Dense (as in DiT)."""
  features: int
  frequency_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    y = timestep_features(t, self.frequency_dim)
    y = Dense(self.features, ('freq', 'mlp'), kernel_init=init, dtype=self.dtype, name='wi')(y)
    return Dense(self.features, ('mlp', 'embed'), kernel_init=init, dtype=self.dtype,
                 name='wo')(nn.silu(y))
