"""DiT: a class-conditional diffusion transformer (Peebles & Xie, 2023), predicting velocity.

Shapes: b batch, H W c image (pixels or latents), p patch, l = (H/p)(W/p) tokens, d model.

  x [b, H, W, c] --patch embed + fixed 2D sin-cos--> [b, l, d]
  t [b] in [0, 1] --timestep MLP--> [b, d]  +  y [b] --class table (num_classes + 1 rows)--> [b, d]
  -> depth adaLN-Zero blocks conditioned on c = t_emb + y_emb -> final adaLN layer -> [b, H, W, c]

Row `num_classes` of the class table is the "null" class used for classifier-free guidance.

With `shift` [b, 2] (pixels in [0, p), one pair per image) the image is placed that far from the
top-left corner of a zero canvas one patch larger per side, so the patch grid cuts it at another
phase: (H/p + 1)^2 tokens, each position the patch's own in image coordinates (a fractional
sin-cos position), and the output cropped back to [b, H, W, c]. The parameters do not depend on
it. Trained and sampled with random shifts (tasks/diffusion `shift_period`), no pixel lies on a
patch border more often than another, so the per-patch errors no longer line up into a grid.

With `shift_mode='roll'` the image is instead rolled by the shift, as on a torus: the same H/p x
W/p tokens, the rows and columns pushed past one edge entering at the other, and each token at
its patch's position in image coordinates as above (so the tokens at the wrap hold pixels from
both edges, which the fractional position tells apart). Overlapping patch windows, decoder
blocks and the decoder's convolution wrap around with it, and the output is rolled back. No
extra tokens: the shift costs next to nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.embeddings import Embed, PatchEmbed, TimestepEmbed, sincos_2d, sincos_2d_offset
from layers.heads import FinalAdaLN
from layers.sharding import shard
from layers.transformers import SIZES, Backbone, block_flops  # noqa: F401  (SIZES: for users)

SHIFT_MODES = ('pad', 'roll')


def _roll_each(x: jax.Array, shift: jax.Array) -> jax.Array:
  """x [b, H, W, c], each image rolled down and right by its own shift [b, 2] pixels."""
  return jax.vmap(lambda img, s: jnp.roll(img, (s[0], s[1]), axis=(0, 1)))(x, shift)


class DiT(nn.Module):
  image_size: int
  channels: int
  patch: int
  hidden: int
  depth: int
  heads: int
  num_classes: int
  mlp_ratio: float = 4.0
  time_scale: float = 1000.0   # t in [0, 1] is scaled so the sinusoid frequencies cover it
  attention_impl: str = 'einsum'
  remat: str | bool = False
  scan_layers: bool = False
  scan_unroll: int = 1
  dtype: jnp.dtype = jnp.float32
  residual_dtype: jnp.dtype = jnp.float32   # the blocks' residual stream (layers/transformers)
  fused_qkv: bool = False
  decoder_conv: int = 0        # > 0: channels of a 3x3 convolution after the patch decoder
  decoder_overlap: bool = False  # each token decodes a 2p x 2p block, overlapping its neighbours
  embed_margin: int = 0          # each token embeds its patch and this many pixels around it
  shift_mode: str = 'pad'        # how `shift` moves the grid: 'pad' (a larger canvas) | 'roll'

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array,
               shift: jax.Array | None = None) -> jax.Array:
    b, hh, ww, c = x.shape
    if hh % self.patch or ww % self.patch:
      raise ValueError(f'image size {hh}x{ww} is not divisible by patch {self.patch}')
    if self.hidden % self.heads:
      raise ValueError(f'hidden {self.hidden} is not divisible by heads {self.heads}')
    if self.shift_mode not in SHIFT_MODES:
      raise ValueError(f'shift_mode {self.shift_mode!r}: one of {SHIFT_MODES}')
    roll = shift is not None and self.shift_mode == 'roll'
    out_h, out_w = hh, ww
    if shift is None:
      pos = jnp.asarray(sincos_2d(self.hidden, hh // self.patch))[None]
    else:
      if shift.shape != (b, 2):
        raise ValueError(f'shift has shape {shift.shape}; it takes [batch, 2] = [{b}, 2] pixels')
      if roll:
        x = _roll_each(x, shift)
      else:
        hh, ww = hh + self.patch, ww + self.patch                      # the canvas
        canvas = jnp.zeros((hh, ww, c), x.dtype)
        x = jax.vmap(lambda img, s: jax.lax.dynamic_update_slice(canvas, img, (s[0], s[1], 0)))(
            x, shift)
      pos = sincos_2d_offset(self.hidden, hh // self.patch, -shift / self.patch)
    h = PatchEmbed(self.patch, self.hidden, dtype=self.dtype, margin=self.embed_margin,
                   wrap=roll, name='patch_embed')(x)                              # [b, l, d]
    h = h + pos.astype(self.dtype)
    h = shard(h, ('act_batch', 'act_len', 'act_embed'))
    cond = TimestepEmbed(self.hidden, dtype=self.dtype, name='t_embed')(t * self.time_scale)
    cond = cond + Embed(self.num_classes + 1, self.hidden, dtype=self.dtype, name='y_embed')(y)
    cond = shard(cond, ('act_batch', 'act_embed'))                                   # [b, d]
    h = Backbone(self.depth, self.heads, self.mlp_ratio, conditioned=True,
                 attention_impl=self.attention_impl, remat=self.remat, scan=self.scan_layers,
                 scan_unroll=self.scan_unroll,
                 residual_dtype=self.residual_dtype, fused_qkv=self.fused_qkv,
                 dtype=self.dtype, name='backbone')(h, cond)
    out = FinalAdaLN(self.patch, c, hh, ww, conv_features=self.decoder_conv,
                     overlap=self.decoder_overlap, wrap=roll, dtype=self.dtype,
                     name='final')(h, cond)
    if roll:
      out = _roll_each(out, -shift)
    elif shift is not None:
      out = jax.vmap(lambda o, s: jax.lax.dynamic_slice(o, (s[0], s[1], 0), (out_h, out_w, c)))(
          out, shift)
    return out.astype(jnp.float32)


def flops_per_example(image_size: int, channels: int, patch: int, hidden: int, depth: int,
                      mlp_ratio: float = 4.0, frequency_dim: int = 256, decoder_conv: int = 0,
                      decoder_overlap: bool = False, embed_margin: int = 0,
                      grid_shift: bool = False, **_) -> int:
  """Forward matmul and convolution FLOPs for one image (2 per multiply-add); with `grid_shift`
  those of the canvas one patch larger that a grid shifted by padding needs (shift_mode 'pad';
  'roll' costs no FLOPs)."""
  if grid_shift:
    image_size += patch
  l, d = (image_size // patch) ** 2, hidden
  ppc = (patch + 2 * embed_margin) ** 2 * channels
  flops = 2 * l * ppc * d                                       # patch embedding
  flops += 2 * (frequency_dim * d + d * d)                      # timestep MLP
  flops += depth * block_flops(l, d, int(d * mlp_ratio), conditioned=True)
  out = patch * patch * (decoder_conv or channels) * (4 if decoder_overlap else 1)
  flops += 2 * d * 2 * d + 2 * l * d * out                      # final adaLN + projection
  if decoder_conv:
    flops += 2 * image_size ** 2 * 9 * decoder_conv * channels  # the 3x3 convolution
  return flops
