"""The backbone: pre-norm blocks of attention + MLP, optionally adaLN-Zero conditioned.

Shapes: b batch, l length, d model. x is [b, l, d]; the conditioning vector c is [b, d].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.attentions import SelfAttention
from layers.linears import Dense
from layers.mlps import Mlp
from layers.normalizations import LayerNorm
from layers.sharding import shard

ACT = ('act_batch', 'act_len', 'act_embed')

# Backbone sizes shared by every family: hidden, depth, heads (MLP ratio 4), as in DiT's Table 1.
SIZES = {
    'T': (128, 6, 4), 'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
}


class AdaLNModulation(nn.Module):
  """c [b, d] -> `num` vectors [b, d] (shifts, scales, gates) from SiLU + Dense.

  Zero-initialised (adaLN-Zero, Peebles & Xie 2023): gates start at 0, so every conditioned
  block starts as the identity and the network as its skip path.
  """
  num: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    zeros = nn.initializers.zeros_init()
    y = Dense(self.num * self.features, ('embed', 'mlp'), kernel_init=zeros, dtype=self.dtype,
              name='proj')(nn.silu(c))
    return jnp.split(y[:, None, :], self.num, axis=-1)                      # num x [b, 1, d]


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)); with `conditioned`, adaLN-Zero shift/scale/gate."""
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  conditioned: bool = False
  norm_eps: float = 1e-6
  attention_impl: str = 'einsum'
  decode: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array | None = None) -> jax.Array:
    d = x.shape[-1]
    affine = not self.conditioned  # adaLN supplies scale and shift itself
    norm = lambda name: LayerNorm(self.norm_eps, use_scale=affine, use_bias=affine,
                                  dtype=self.dtype, name=name)
    if self.conditioned:
      if c is None:
        raise ValueError('a conditioned Block needs the conditioning vector c')
      shift1, scale1, gate1, shift2, scale2, gate2 = AdaLNModulation(
          6, d, dtype=self.dtype, name='adaln')(c)
    x = shard(x.astype(self.dtype), ACT)  # the residual stream runs in the compute dtype
    h = norm('norm1')(x)
    if self.conditioned:
      h = modulate(h, shift1, scale1)
    h = SelfAttention(self.num_heads, causal=self.causal, impl=self.attention_impl,
                      decode=self.decode, dtype=self.dtype, name='attn')(h)
    x = x + (gate1 * h if self.conditioned else h)
    h = norm('norm2')(x)
    if self.conditioned:
      h = modulate(h, shift2, scale2)
    h = Mlp(int(d * self.mlp_ratio), dtype=self.dtype, name='mlp')(h)
    x = x + (gate2 * h if self.conditioned else h)
    return shard(x, ACT)


class Backbone(nn.Module):
  """`depth` Blocks; `remat` recomputes each block's activations in the backward pass."""
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  conditioned: bool = False
  norm_eps: float = 1e-6
  attention_impl: str = 'einsum'
  remat: bool = False
  decode: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array | None = None) -> jax.Array:
    block_cls = nn.remat(Block, prevent_cse=True) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, self.causal, self.conditioned, self.norm_eps,
                    self.attention_impl, self.decode, self.dtype, name=f'block{i}')(x, c)
    return x


def block_flops(length: int, dim: int, mlp_dim: int, conditioned: bool = False) -> int:
  """Forward matmul FLOPs of one Block for one example (2 per multiply-add).

  Counts the full l x l attention matrix (q k^T and probs v) even when causal: that is what the
  einsum and XLA paths compute.
  """
  l, d, f = length, dim, mlp_dim
  flops = 2 * l * d * 3 * d + 2 * 2 * l * l * d + 2 * l * d * d + 2 * 2 * l * d * f
  if conditioned:
    flops += 2 * d * 6 * d  # adaLN projection: once per example, not per token
  return flops
