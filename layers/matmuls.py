"""Two-operand einsums that run 16-bit matmuls on XLA CPU's native bfloat16 kernels.

XLA's CPU backend runs a bfloat16 dot natively only when the dot returns float32
(`preferred_element_type`); a bfloat16 x bfloat16 -> bfloat16 dot, and a dot that mixes a
float32 operand with a bfloat16 one, it converts to float32 first and runs at the float32 rate
(docs/PERFORMANCE.md: 2.2x slower on an AVX512-BF16 CPU). Autodiff of a float32-returning dot
gives exactly the mixed kind: its transposes take the float32 cotangent. `einsum` therefore has
a written-out backward pass in which each matmul takes 16-bit operands, accumulates in float32
and rounds its result once to the compute dtype; the cotangent of a float32 output (attention
scores, vocabulary logits) is rounded to 16 bits before its two matmuls, as mixed-precision
training rounds what flows into a 16-bit matmul. A bias is added to the float32 accumulator in
the same op, so its gradient is a float32 sum too (a sum of the 16-bit cotangent is what XLA's
CPU backend otherwise turns into a slow windowed reduction). The op's output is named for
`jax.checkpoint` policies (MATMUL, BATCHED_MATMUL), which cannot see a dot inside it.

Accelerators accumulate 16-bit matmuls in float32 anyway, so there a dot that returns its
operands' dtype keeps the plain path (a bias is then added in the output dtype); `cpu_kernels`
decides (None: on the CPU backend only). A bfloat16 dot that returns float32 (attention scores,
vocabulary logits) takes the written-out backward pass on accelerators too: autodiff would pair
its float32 cotangent with a 16-bit operand, and XLA runs that pair as a float32 matmul (on one
H200, 2026-12-04, GPT-B's vocabulary gradients ran as TF32 GEMMs, 8% of the step:
docs/PERFORMANCE.md). Float32 operands always take the plain path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from layers.normalizations import reduce_to

MATMUL, BATCHED_MATMUL = 'matmul', 'batched_matmul'


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype=jnp.float32, *, bias=None,
           out_dtype=None, cpu_kernels: bool | None = None) -> jax.Array:
  """einsum(spec, a, b) + bias with both operands cast to `dtype` and the result in
  `out_dtype` (default `dtype`); on the CPU path accumulated in float32 with the bias. `bias`
  broadcasts against the output's trailing axes. `spec` names every axis by a letter, with no
  '...', and every letter of an operand appears in the other operand or the output (a matmul:
  no traces, no axis summed within one operand), so that each operand's gradient is again such
  an einsum.
  """
  dtype = jnp.dtype(dtype)
  out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
  a, b = a.astype(dtype), b.astype(dtype)
  on_cpu = cpu_16bit(dtype, cpu_kernels)
  # float16 keeps autodiff's float32 cotangent: a mean loss's (about 1e-9 per element) would
  # underflow float16's range, not bfloat16's
  widened = dtype == jnp.bfloat16 and out_dtype.itemsize > dtype.itemsize
  if not (on_cpu or widened):
    result = jnp.einsum(spec, a, b, preferred_element_type=out_dtype)
    return result if bias is None else result + bias.astype(out_dtype)
  x, y, out = _parse(spec)
  if bias is not None and bias.ndim > len(out):
    raise ValueError(f'bias of shape {bias.shape} has more axes than the output of {spec!r}')
  result = _einsum_f32_accumulate(spec, out_dtype, dtype, on_cpu, a, b, bias)
  return checkpoint_name(result, BATCHED_MATMUL if _batched(x, y, out) else MATMUL)


def cpu_16bit(dtype, cpu_kernels: bool | None = None) -> bool:
  """Whether `dtype` is a 16-bit float on the CPU backend (`cpu_kernels`; None: decided by the
  backend), the case every written-out CPU path of this module and its users is for."""
  if cpu_kernels is None:
    cpu_kernels = jax.default_backend() == 'cpu'
  dtype = jnp.dtype(dtype)
  return cpu_kernels and dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating)


def _parse(spec: str) -> tuple[str, str, str]:
  inputs, _, out = spec.replace(' ', '').partition('->')
  operands = inputs.split(',')
  if '.' in spec or not out or len(operands) != 2:
    raise ValueError(f'einsum spec {spec!r}: write two operands and the output with one letter '
                     "per axis (no '...', no implicit output)")
  x, y = operands
  for name, mine, other in (('first', x, y), ('second', y, x)):
    if len(set(mine)) != len(mine):
      raise ValueError(f'einsum spec {spec!r}: the {name} operand repeats a letter (a diagonal '
                       'or trace); only matmul-like specs have einsum gradients')
    lonely = sorted(set(mine) - set(other) - set(out))
    if lonely:
      raise ValueError(f'einsum spec {spec!r}: the {name} operand sums axes {lonely} on its own; '
                       'only matmul-like specs have einsum gradients')
  return x, y, out


def _dot(spec, x, y):
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _batched(x: str, y: str, out: str) -> bool:
  """A letter in both operands and the output: a batched matmul (attention's)."""
  return bool(set(x) & set(y) & set(out))


def pack_residual(x: jax.Array) -> jax.Array:
  """x to keep for a backward pass: a 16-bit float array on the CPU backend as its uint16 bits.

  Under nn.scan each saved array becomes a [depth, ...] buffer that the forward loop writes a
  layer at a time. XLA's CPU backend has no bfloat16 dynamic-update-slice: it converts the
  whole buffer to float32 and back around every layer's write, which made the bfloat16 scan
  1.3x slower than the same blocks unrolled (docs/PERFORMANCE.md). Integers it writes in
  place. `unpack_residual` undoes it; elsewhere both are the identity."""
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if cpu_16bit(x.dtype) else x


def unpack_residual(x: jax.Array, dtype) -> jax.Array:
  """pack_residual's input back from what it returned, given that input's dtype."""
  dtype = jnp.dtype(dtype)
  packed = x.dtype == jnp.uint16 and dtype != x.dtype and dtype.itemsize == 2
  return jax.lax.bitcast_convert_type(x, dtype) if packed else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _einsum_f32_accumulate(spec, out_dtype, dtype, on_cpu, a, b, bias):
  acc = _dot(spec, a, b)
  return (acc if bias is None else acc + bias.astype(jnp.float32)).astype(out_dtype)


def _forward(spec, out_dtype, dtype, on_cpu, a, b, bias):
  return (_einsum_f32_accumulate(spec, out_dtype, dtype, on_cpu, a, b, bias),
          (pack_residual(a), pack_residual(b), bias))


def _backward(spec, out_dtype, dtype, on_cpu, saved, g):
  a, b, bias = saved
  a, b = unpack_residual(a, dtype), unpack_residual(b, dtype)
  x, y, out = _parse(spec)
  bias_grad = None if bias is None else (
      reduce_to(g.astype(jnp.float32), bias.shape).astype(bias.dtype))
  if on_cpu and _batched(x, y, out):
    # XLA CPU hands some transposes of a batched matmul to a kernel without bfloat16 x bfloat16
    # -> float32, which fails at run time; float32 operands run everywhere
    a_op, b_op, g = a.astype(jnp.float32), b.astype(jnp.float32), g.astype(jnp.float32)
  else:
    a_op, b_op, g = a, b, g.astype(a.dtype)   # 16-bit cotangent: a native kernel again
  return (_dot(f'{out},{y}->{x}', g, b_op).astype(a.dtype),
          _dot(f'{x},{out}->{y}', a_op, g).astype(b.dtype), bias_grad)


_einsum_f32_accumulate.defvjp(_forward, _backward)


def dense_spec(x_ndim: int, num_contract: int, kernel_ndim: int) -> str:
  """The einsum spec of x [..., k contracted] . kernel [k contracted, outputs...]."""
  letters = 'abcdefghijklmnopqrstuvwxyz'
  if x_ndim + kernel_ndim - num_contract > len(letters):
    raise ValueError(f'too many axes for one einsum: x {x_ndim}, kernel {kernel_ndim}')
  batch = x_ndim - num_contract
  lead, contract = letters[:batch], letters[batch:x_ndim]
  outs = letters[x_ndim:x_ndim + kernel_ndim - num_contract]
  return f'{lead}{contract},{contract}{outs}->{lead}{outs}'
