"""Output heads: classifier, and DiT's final adaLN layer with patch output."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.embeddings import unpatchify
from layers.linears import Dense
from layers.normalizations import LayerNorm
from layers.transformers import AdaLNModulation, modulate


class ClassifierHead(nn.Module):
  """norm + Dense to logits [.., classes] ('embed', 'vocab'), zero-initialised as in big_vision."""
  num_classes: int
  norm_eps: float = 1e-6
  zero_init: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, return_features: bool = False):
    """Logits; with `return_features`, (logits, the normalised input they are a linear map of)."""
    x = LayerNorm(self.norm_eps, dtype=self.dtype, name='norm')(x)
    init = nn.initializers.zeros_init() if self.zero_init else None
    logits = Dense(self.num_classes, ('embed', 'vocab'), kernel_init=init, dtype=self.dtype,
                   name='proj')(x)
    return (logits, x) if return_features else logits


class FinalAdaLN(nn.Module):
  """DiT's last layer: adaLN (shift, scale) on a bare norm, then a zero-init Dense to patches,
  unpatchified back to [b, H, W, c]."""
  patch: int
  channels: int
  height: int
  width: int
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = AdaLNModulation(2, x.shape[-1], dtype=self.dtype, name='adaln')(c)
    x = LayerNorm(self.norm_eps, use_scale=False, use_bias=False, dtype=self.dtype)(x)
    x = modulate(x, shift, scale)
    x = Dense(self.patch * self.patch * self.channels, ('embed', 'patch'),
              kernel_init=nn.initializers.zeros_init(), dtype=self.dtype, name='proj')(x)
    return unpatchify(x, self.patch, self.height, self.width)
