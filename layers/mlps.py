"""The transformer feed-forward block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.linears import Dense, normal_or_default
from layers.matmuls import pack_residual, unpack_residual
from layers.sharding import shard

_SQRT_2_OVER_PI = 0.7978845608028654
_CUBIC = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """jax.nn.gelu(x, approximate=True), whose backward pass keeps only x.

  Autodiff of the tanh formula saves four [b, l, f] intermediates per MLP for the backward pass;
  under SCAN_LAYERS each becomes a stacked [depth, b, l, f] buffer that the loop zero-fills,
  copies and slices, which cost a fifth of DiT_T_FashionMNIST's CPU step (docs/PERFORMANCE.md).
  The derivative is cheap to recompute from x in one fused elementwise pass."""
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  x32 = x.astype(jnp.float32)
  tanh = jnp.tanh(_SQRT_2_OVER_PI * (x32 + _CUBIC * x32 * x32 * x32))
  return (0.5 * x32 * (1.0 + tanh)).astype(x.dtype), pack_residual(x)


def _gelu_bwd(x, g):
  x32 = unpack_residual(x, g.dtype).astype(jnp.float32)
  tanh = jnp.tanh(_SQRT_2_OVER_PI * (x32 + _CUBIC * x32 * x32 * x32))
  du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * x32 * x32)
  slope = 0.5 * (1.0 + tanh) + 0.5 * x32 * (1.0 - tanh * tanh) * du_dx
  return ((g.astype(jnp.float32) * slope).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nn.Module):
  """d -> f -> d with tanh-approximated GELU (as GPT-2 and DiT)."""
  hidden: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.0         # > 0: normal(init_std) for wi; 0: Xavier-uniform
  out_init_std: float = 0.0     # the same for wo

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    y = Dense(self.hidden, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype,
              kernel_init=normal_or_default(self.init_std), name='wi')(x)   # [b, l, f]
    y = shard(gelu_tanh(y), ('act_batch', 'act_len', 'act_mlp'))
    return Dense(d, ('mlp', 'embed'), use_bias=self.use_bias, dtype=self.dtype,
                 kernel_init=normal_or_default(self.out_init_std), name='wo')(y)
