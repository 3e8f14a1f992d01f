"""2D convolutions on NHWC activations with HWIO kernels that carry logical axis names."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Initializer = nn.initializers.Initializer


class Conv(nn.Module):
  """y = conv(x, W) + b for x [b, H, W, c]; kernel [kh, kw, c, features].

  `padding` is 'SAME', 'VALID' or explicit ((top, bottom), (left, right)) pixel counts, so that a
  PyTorch layer's asymmetric padding (diffusers' stride-2 downsampler pads one pixel right and
  bottom) is written as it is. Parameters are float32; the convolution runs in `dtype`.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  kernel_axes: tuple[str, str, str, str] = ('kernel_h', 'kernel_w', 'conv_in', 'conv_out')
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                        kernel_shape, jnp.float32)
    padding = self.padding if isinstance(self.padding, str) else tuple(map(tuple, self.padding))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=self.strides,
        padding=padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (self.kernel_axes[-1],)),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
