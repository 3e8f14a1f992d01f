"""Normalisations computed in float32 whatever the compute dtype (variance in bf16 is too coarse)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn


def _standardize(x32, epsilon):
  mean = x32.mean(-1, keepdims=True)
  centered = x32 - mean
  rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + epsilon)
  return centered * rstd, rstd


def reduce_to(g, shape):
  """Sum g over the dims a parameter of `shape` was broadcast along to g's shape."""
  lead = g.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                     if n == 1 and g.shape[i + lead] != 1)
  return g.sum(axes).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x, scale, shift, epsilon: float, dtype):
  """((x - mean) / std) * scale + shift over the last dim, in float32, cast to `dtype`.

  scale and shift broadcast against x: [d] parameters, or adaLN's per-example [b, 1, d]. The
  backward pass keeps only x, scale and shift and recomputes the statistics: autodiff of the
  formula saves the centred and the normalised x as well, two more [b, l, d] arrays per norm
  that SCAN_LAYERS stacks over depth (docs/PERFORMANCE.md)."""
  return _layer_norm_fwd(x, scale, shift, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, shift, epsilon, dtype):
  y, _ = _standardize(x.astype(jnp.float32), epsilon)
  out = y * scale.astype(jnp.float32) + shift.astype(jnp.float32)
  return out.astype(dtype), (x, scale, shift)


def _layer_norm_bwd(epsilon, dtype, res, g):
  x, scale, shift = res
  y, rstd = _standardize(x.astype(jnp.float32), epsilon)
  g32 = g.astype(jnp.float32)
  gy = g32 * scale.astype(jnp.float32)
  dx = rstd * (gy - gy.mean(-1, keepdims=True) - y * (gy * y).mean(-1, keepdims=True))
  return (dx.astype(x.dtype), reduce_to(g32 * y, scale.shape).astype(scale.dtype),
          reduce_to(g32, shift.shape).astype(shift.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last dim; `use_scale=use_bias=False` gives the bare norm adaLN modulates.

  `scale` and `shift` passed to the call (adaLN's [b, 1, d]) modulate the output as
  y * (1 + scale) + shift inside the same fused norm (see `layer_norm`)."""
  epsilon: float = 1e-6
  use_scale: bool = True
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, shift: jax.Array | None = None,
               scale: jax.Array | None = None) -> jax.Array:
    d = x.shape[-1]
    gain = (self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ('norm',)), (d,), jnp.float32)
            if self.use_scale else jnp.ones((d,), jnp.float32))
    bias = (self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            ('norm',)), (d,), jnp.float32)
            if self.use_bias else jnp.zeros((d,), jnp.float32))
    # (y gain + bias) (1 + scale) + shift, as one gain and one bias
    if scale is not None:
      gain, bias = gain * (1 + scale.astype(jnp.float32)), bias * (1 + scale.astype(jnp.float32))
    if shift is not None:
      bias = bias + shift.astype(jnp.float32)
    return layer_norm(x, gain, bias, self.epsilon, self.dtype)


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
