"""ViT: image classification with a bidirectional backbone (Dosovitskiy et al., 2021).

Shapes: b batch, H W c image, p patch, l = (H/p)(W/p) patches, d model, v classes.

  x [b, H, W, c] --patch embed + fixed 2D sin-cos--> [b, l, d] --prepend class token--> [b, l+1, d]
  -> depth blocks -> norm + Dense on the class token -> logits [b, v]

With pool='gap' there is no class token: the head reads the mean of the l patch tokens, which
Beyer et al. 2022 ("Better plain ViT baselines for ImageNet-1k") found trains faster.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.embeddings import ConvStem, PatchEmbed, sincos_2d, stem_strides
from layers.heads import ClassifierHead
from layers.sharding import shard
from layers.transformers import SIZES, Backbone, block_flops  # noqa: F401  (SIZES: for users)


class ViT(nn.Module):
  image_size: int
  channels: int
  patch: int
  hidden: int
  depth: int
  heads: int
  num_classes: int
  mlp_ratio: float = 4.0
  attention_impl: str = 'einsum'
  remat: str | bool = False
  scan_layers: bool = False
  scan_unroll: int = 1
  dtype: jnp.dtype = jnp.float32
  residual_dtype: jnp.dtype = jnp.float32   # the blocks' residual stream (layers/transformers)
  fused_qkv: bool = False
  pool: str = 'cls'                          # 'cls' (class token) | 'gap' (mean of patch tokens)
  stem: str = 'patch'                        # 'patch' (one p x p matmul) | 'conv' (ConvStem)
  embed_margin: int = 0                      # stem 'patch': each token also embeds this many
                                             # pixels of its neighbours on every side

  @nn.compact
  def __call__(self, x: jax.Array, return_features: bool = False):
    """Logits [b, v]; with `return_features`, (logits, the pre-logit features [b, d]), which a
    trained classifier gives as the embedding its samples' Fréchet distance is measured on."""
    b, hh, ww, _ = x.shape
    if hh % self.patch or ww % self.patch:
      raise ValueError(f'image size {hh}x{ww} is not divisible by patch {self.patch}')
    if self.stem not in STEMS:
      raise ValueError(f'stem {self.stem!r}: use one of {STEMS}')
    if self.stem == 'patch':
      h = PatchEmbed(self.patch, self.hidden, dtype=self.dtype, margin=self.embed_margin,
                     name='patch_embed')(x)
    elif self.embed_margin:
      raise ValueError(f'embed_margin {self.embed_margin} needs stem "patch", not {self.stem!r}')
    else:
      h = ConvStem(self.patch, self.hidden, dtype=self.dtype, name='conv_embed')(x)
    if h.shape[1] != (hh // self.patch) * (ww // self.patch):
      raise ValueError(f'the conv stem turns {hh}x{ww} pixels into {h.shape[1]} tokens, not the '
                       f'{(hh // self.patch) * (ww // self.patch)} of patch {self.patch}: use a '
                       f'power-of-two patch')
    h = h + jnp.asarray(sincos_2d(self.hidden, hh // self.patch), self.dtype)[None]
    if self.pool not in POOLS:
      raise ValueError(f'pool {self.pool!r}: use one of {POOLS}')
    if self.pool == 'cls':
      cls = self.param('cls_token', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('embed',)), (self.hidden,), jnp.float32)
      h = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.hidden)), h], 1)
    h = shard(h, ('act_batch', 'act_len', 'act_embed'))           # [b, l+1, d] or gap's [b, l, d]
    h = Backbone(self.depth, self.heads, self.mlp_ratio, attention_impl=self.attention_impl,
                 remat=self.remat, scan=self.scan_layers, scan_unroll=self.scan_unroll,
                 residual_dtype=self.residual_dtype,
                 fused_qkv=self.fused_qkv, dtype=self.dtype, name='backbone')(h)
    pooled = h[:, 0] if self.pool == 'cls' else h.astype(jnp.float32).mean(1).astype(self.dtype)
    out = ClassifierHead(self.num_classes, dtype=self.dtype, name='head')(
        pooled, return_features=return_features)
    if return_features:
      return out[0].astype(jnp.float32), out[1].astype(jnp.float32)
    return out.astype(jnp.float32)                                          # [b, v]


POOLS = ('cls', 'gap')
STEMS = ('patch', 'conv')


def flops_per_example(image_size: int, channels: int, patch: int, hidden: int, depth: int,
                      num_classes: int, mlp_ratio: float = 4.0, pool: str = 'cls',
                      stem: str = 'patch', embed_margin: int = 0, **_) -> int:
  """Forward matmul and convolution FLOPs for one image (2 per multiply-add)."""
  l, d = (image_size // patch) ** 2, hidden
  if stem == 'conv':   # layers.embeddings.ConvStem: n SAME 3x3 stride-2 convolutions, then 1x1
    n, size, c_in, flops = stem_strides(patch), image_size, channels, 0
    for i in range(n):
      size, c_out = -(-size // 2), max(8, d >> (n - i))
      flops += 2 * size * size * 9 * c_in * c_out
      c_in = c_out
    flops += 2 * l * c_in * d
  else:
    flops = 2 * l * (patch + 2 * embed_margin) ** 2 * channels * d
  flops += depth * block_flops(l + (pool == 'cls'), d, int(d * mlp_ratio))
  return flops + 2 * d * num_classes
