"""The transformer feed-forward block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.linears import Dense
from layers.sharding import shard


class Mlp(nn.Module):
  """d -> f -> d with tanh-approximated GELU (as GPT-2 and DiT)."""
  hidden: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    y = Dense(self.hidden, ('embed', 'mlp'), use_bias=self.use_bias, dtype=self.dtype,
              name='wi')(x)                                                 # [b, l, f]
    y = shard(nn.gelu(y, approximate=True), ('act_batch', 'act_len', 'act_mlp'))
    return Dense(d, ('mlp', 'embed'), use_bias=self.use_bias, dtype=self.dtype, name='wo')(y)
