"""Normalisations computed in float32 whatever the compute dtype (variance in bf16 is too coarse)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


class LayerNorm(nn.Module):
  """LayerNorm over the last dim; `use_scale=use_bias=False` gives the bare norm adaLN modulates."""
  epsilon: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                               ('norm',)), (d,), jnp.float32)
    if self.use_bias:
      y = y + self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              ('norm',)), (d,), jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.epsilon)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ('norm',)), (x.shape[-1],), jnp.float32)
    return (y * scale).astype(self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm over the channels (last dim) of [b, ..., c], statistics per example and group over
  every other dim, as torch.nn.GroupNorm computes them (biased variance)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'{self.name}: {c} channels are not divisible into num_groups='
                       f'{self.num_groups} groups')
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = x32.mean(axes, keepdims=True)
    var = jnp.square(x32 - mean).mean(axes, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ('norm',)), (c,), jnp.float32)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ('norm',)), (c,), jnp.float32)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
