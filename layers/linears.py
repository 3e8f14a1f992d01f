"""Dense layers whose kernels always carry logical axis names."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers import matmuls

Initializer = nn.initializers.Initializer


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Sequence) else (x,)


class DenseGeneral(nn.Module):
  """y = x . W + b, contracting the trailing `len(axis)` input dims into `features`.

  `kernel_axes` is required and names every kernel dim (contracted dims first): there is no
  default, so no weight is ever silently replicated. Parameters are float32; the matmul runs in
  `dtype`. `weights_only=True` returns (kernel, bias or None) for an input like `x` instead of
  applying them: a caller can then fuse several projections into one matmul while each keeps
  its own parameter names, layout and initial draw.
  """
  features: int | Sequence[int]
  kernel_axes: Sequence[str]
  num_contract: int = 1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer | None = None   # None: Xavier-uniform over (contracted, output) dims
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array, weights_only: bool = False):
    features = _tuple(self.features)
    k = self.num_contract
    in_shape = x.shape[-k:]
    kernel_shape = tuple(in_shape) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f'{self.name}: kernel_axes {tuple(self.kernel_axes)} has '
                       f'{len(self.kernel_axes)} names for kernel shape {kernel_shape}')
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=tuple(range(k)),
        out_axis=tuple(range(k, len(kernel_shape))))
    kernel = self.param('kernel', nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                        kernel_shape, jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(
          self.bias_init, tuple(self.kernel_axes[k:])), features, jnp.float32)
    if weights_only:
      return kernel, bias
    return matmuls.einsum(matmuls.dense_spec(x.ndim, k, kernel.ndim), x, kernel, self.dtype,
                          bias=bias)


def normal_or_default(std: float) -> Initializer | None:
  """normal(std) for std > 0, else None (DenseGeneral's Xavier-uniform default)."""
  return nn.initializers.normal(std) if std > 0 else None


def Dense(features: int, kernel_axes: Sequence[str], **kwargs) -> DenseGeneral:  # noqa: N802
  """A DenseGeneral contracting the last dim: kernel [in, features]."""
  return DenseGeneral(features=features, kernel_axes=kernel_axes, num_contract=1, **kwargs)
