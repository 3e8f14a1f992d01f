"""Multi-head self-attention: bidirectional or causal, einsum reference or fused kernels, KV cache.

Shapes: b batch, l query length, s key length, d model, n heads, h head dim.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers import matmuls, sharding
from layers.linears import DenseGeneral, normal_or_default

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row stays NaN-free
IMPLEMENTATIONS = ('einsum', 'xla', 'cudnn', 'splash', 'auto')
CUDNN_CUSTOM_CALL = '__cudnn$fmha'   # how cuDNN's fused attention appears in compiled HLO
# How each fused kernel appears in the lowered (StableHLO) text of a step: cuDNN's call target,
# and the names the splash kernel gives its Mosaic custom calls (any Pallas kernel lowered for a
# TPU is a `tpu_custom_call`: only its kernel_name says which). Run by Pallas's interpreter off a
# TPU, splash leaves no trace of its own.
FUSED_KERNEL_MARKERS = {'cudnn': CUDNN_CUSTOM_CALL, 'splash': 'kernel_name = "splash_'}
SPLASH_BLOCK = 128   # the splash kernel's default q and kv blocks: lengths must be multiples


def attend(q, k, v, mask=None, *, causal: bool = False, impl: str = 'einsum'):
  """softmax(q k^T / sqrt(h)) v with the softmax in float32.

  q [b, l, n, h], k/v [b, s, n, h]; mask broadcastable to [b, n, l, s] (True = may attend).
  `causal` masks key j > query i (for l == s). 'einsum' is the readable reference; 'xla' and
  'cudnn' go through jax.nn.dot_product_attention (`cudnn_attention`); 'splash' is the Pallas
  TPU flash kernel (`splash_attention`); 'auto' takes the fused kernel `fused_kernel` names for
  q where that kernel accepts the call and its gradient, and XLA's path otherwise (with a
  warning when a kernel refused).
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'attention impl {impl!r}; choose one of {IMPLEMENTATIONS}')
  scale = 1.0 / math.sqrt(q.shape[-1])
  if impl == 'auto':
    kernel, refusal = auto_kernel(q, k, v, mask, causal=causal)
    if kernel is not None:
      return _fused(kernel, q, k, v, causal)
    if refusal is not None:
      warnings.warn(f"ATTENTION_IMPL='auto': {refusal}; using XLA's path instead", stacklevel=2)
    impl = 'xla'
  if impl == 'splash':
    if mask is not None:
      raise ValueError("ATTENTION_IMPL='splash' takes no explicit mask (only `causal`); use "
                       "'auto', 'xla' or 'einsum' for a masked call")
    return splash_attention(q, k, v, causal=causal)
  if impl == 'cudnn' and mask is None:
    return cudnn_attention(q, k, v, causal=causal)
  if impl != 'einsum':
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        implementation=impl)
  logits = matmuls.einsum('blnh,bsnh->bnls', q, k, q.dtype, out_dtype=jnp.float32) * scale
  if causal:
    l, s = logits.shape[-2:]
    causal_mask = jnp.arange(l)[:, None] >= jnp.arange(s)[None, :]
    mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return matmuls.einsum('bnls,bsnh->blnh', probs, v, v.dtype)


def cudnn_attention(q, k, v, *, causal: bool = False, implementation: str = 'cudnn'):
  """jax.nn.dot_product_attention through cuDNN's fused kernel (`implementation`; tests run the
  same call through 'xla'). cuDNN refuses an odd length when the gradient is taken (on one
  H200, 2026-12-04: "Unsupported sequence length Q 197", ViT-B/16's 197 tokens), so an odd
  length is padded by one query and one key, which the padding mask hides (both sequence
  lengths given: the real lengths are then equal, so a causal mask is the same whether the
  kernel aligns it top-left or bottom-right); the padded query's row is dropped, and its zero
  cotangent adds nothing to the gradients."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  b, l, s = q.shape[0], q.shape[1], k.shape[1]
  if l % 2 == 0 and s % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        implementation=implementation)
  even = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
  lengths = lambda n: sharding.shard(jnp.full((b,), n, jnp.int32), ('act_batch',))
  out = jax.nn.dot_product_attention(
      even(q), even(k), even(v), scale=scale, is_causal=causal, query_seq_lengths=lengths(l),
      key_value_seq_lengths=lengths(s), implementation=implementation)
  return out[:, :l]


def auto_kernel(q, k, v, mask=None, *, causal: bool = False
                ) -> tuple[str | None, str | None]:
  """(the fused kernel ATTENTION_IMPL='auto' runs for this call, or None for XLA's path; which
  kernel `fused_kernel` named and why it refused, or None). Takes arrays or
  jax.ShapeDtypeStructs, so that the FLOP count (trainer/flops.py) asks exactly what `attend`
  will decide: after a refusal the whole score matrix runs, and MFU counts it."""
  kernel = fused_kernel(q, mask)
  if kernel is None:
    return None, None
  refusal = _refusal(kernel, causal, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
                     jax.sharding.get_abstract_mesh(), tuple(nn.get_logical_axis_rules()))
  if refusal is None:
    return kernel, None
  return None, f'the {kernel} fused attention refused q {q.shape} {q.dtype} ({refusal})'


def fused_kernels_in(stablehlo: str) -> set[str]:
  """The fused attention kernels the lowered text of a computation calls (`FUSED_KERNEL_MARKERS`;
  `jax.jit(f).lower(...).as_text()`), so that a report says what ran rather than what was asked."""
  return {kernel for kernel, marker in FUSED_KERNEL_MARKERS.items() if marker in stablehlo}


@functools.lru_cache(maxsize=256)
def _refusal(kernel: str, causal: bool, q: jax.ShapeDtypeStruct, k: jax.ShapeDtypeStruct,
             v: jax.ShapeDtypeStruct, mesh=None, rules=()) -> str | None:
  """Why `kernel` cannot run this attention and its gradient (None: it can), found by tracing
  both abstractly. JAX raises some of cuDNN's refusals only in the gradient's rule, outside the
  forward call, where a try around that call cannot see them; this asks before choosing.

  Only refusals raised while tracing are seen: one that a compiler raises later (Mosaic lowering
  a Pallas kernel, XLA compiling cuDNN's call) still fails the step. The abstract mesh and the
  logical axis rules of the call are part of the cache key: splash runs per device under them."""
  def loss(q, k, v):
    return jnp.sum(_fused(kernel, q, k, v, causal).astype(jnp.float32))
  try:
    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  except (NotImplementedError, ValueError) as e:   # the kernels' ways of saying no
    return f'{type(e).__name__}: {e}'
  except RuntimeError as e:   # a GPU without cuDNN; anything else is a bug to see
    if 'cudnn' not in str(e).lower():
      raise
    return f'{type(e).__name__}: {e}'
  return None


def splash_attention(q, k, v, *, causal: bool = False, interpret: bool | None = None):
  """The same attention through JAX's Pallas splash (block-sparse flash) kernel for TPUs: the
  scores never leave the chip's VMEM, and a causal call skips the key blocks wholly above the
  diagonal.

  Lengths must be multiples of SPLASH_BLOCK (the kernel's default blocks). The kernel works on
  one example's [n, l, h], so it is mapped over the batch; under a mesh it runs in a shard_map
  over the blocks `shard` gives q (batch over data and fsdp, heads over tensor), because XLA
  cannot partition a custom call and would gather every device's q, k and v onto each.
  `interpret` (default: off on a TPU, on elsewhere) runs the kernel in Pallas's interpreter,
  which is correct but slow: it is how the CPU tests check it.
  """
  b, l, n, h = q.shape
  s = k.shape[1]
  if l % SPLASH_BLOCK or s % SPLASH_BLOCK:
    raise ValueError(f'splash attention: query length {l} and key length {s} must be multiples '
                     f"of {SPLASH_BLOCK}; ATTENTION_IMPL='auto' takes XLA's path for these")
  if interpret is None:
    interpret = jax.default_backend() != 'tpu'
  # the kernel applies no scale of its own: 1/sqrt(h) goes on q, in float32 before the cast back
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(h))).astype(q.dtype)

  def local(q, k, v):
    kernel = _splash_kernel(q.shape[2], l, s, causal, interpret)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)                         # [b, n, l, h]
    return heads_major(jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v)))

  spec = sharding.mesh_spec(q.shape, ('act_batch', None, 'act_heads', None))
  if spec is None:
    return local(q, k, v)
  # check_vma=False: the interpreter's internal state carries no varying-axes annotation
  return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
      q, k, v)


def _splash_kernel(heads: int, l: int, s: int, causal: bool, interpret: bool):
  # built in each trace, since it holds its block tables as arrays of that trace; the NumPy walk
  # over the mask that makes them is cached by JAX per mask
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  one = splash.CausalMask((l, s)) if causal else splash.FullMask((l, s))
  return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _fused(kernel: str, q, k, v, causal: bool):
  return (cudnn_attention if kernel == 'cudnn' else splash_attention)(q, k, v, causal=causal)


def fused_kernel(q, mask=None, device=None) -> str | None:
  """The fused attention kernel 'auto' takes for q on `device` (default the first device):
  'cudnn', 'splash' or None (XLA's path).

  - 'cudnn': an NVIDIA GPU of compute capability 8 or more, 16-bit q, a head dimension that is
    a multiple of 8 up to 128 (an odd length is padded: `cudnn_attention`).
  - 'splash': a TPU and a sequence length that is a multiple of SPLASH_BLOCK.
  - Neither with a mask beyond the causal one (decoding's cache mask goes to XLA).

  These are the kernels' documented limits; `attend` then traces the chosen kernel's gradient
  abstractly before it commits (`_refusal`), because JAX raises some of cuDNN's refusals only in
  the gradient's rule, outside the forward call (on one H200, 2026-12-04, the training step of
  ViT-B/16's 197 tokens failed with "Unsupported sequence length Q 197" under nn.scan).

  jax.nn.dot_product_attention(implementation=None) would not decide this: in JAX 0.11 it always
  takes XLA's path, which on a GPU materialises the l x l scores (on one H200, 2026-12-04, GPT-B
  ran no faster with 'auto' than with the einsum reference: docs/PERFORMANCE.md)."""
  device = device or jax.devices()[0]
  if mask is not None:
    return None
  l, h = q.shape[-3], q.shape[-1]
  if device.platform == 'tpu':
    return 'splash' if l % SPLASH_BLOCK == 0 else None
  if device.platform != 'gpu':
    return None
  try:
    major = int(str(getattr(device, 'compute_capability', '')).split('.')[0])
  except ValueError:   # not a CUDA device (ROCm names its architecture instead)
    return None
  if major >= 8 and q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128:
    return 'cudnn'
  return None


class SelfAttention(nn.Module):
  """Self-attention with q/k/v projections 'query', 'key', 'value' [d, n, h] ('embed', 'heads',
  'kv'). `fused_qkv` applies the three as one matmul of three times the output width, their
  kernels stacked [d, 3, n, h] on the fly (except for one-token calls): the same parameters,
  checkpoints and initial draw, so it is a speed knob only.

  With `decode=True` keys and values go to a 'cache' collection of length `max_len`, taken from
  the input length at init (init with a [b, max_len, d] dummy). Each call then appends its l
  tokens at the cache index and attends causally over everything written so far: one call with
  the prompt (prefill), then one call per generated token.
  """
  num_heads: int
  head_dim: int | None = None
  causal: bool = False
  use_bias: bool = True
  impl: str = 'einsum'
  decode: bool = False
  fused_qkv: bool = False
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.0         # > 0: normal(init_std) for q, k, v; 0: Xavier-uniform
  out_init_std: float = 0.0     # the same for the output projection

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, l, d = x.shape
    n = self.num_heads
    if self.head_dim is None and d % n:
      raise ValueError(f'model dim {d} is not divisible by num_heads {n}')
    h = self.head_dim or d // n
    proj = lambda name: DenseGeneral((n, h), ('embed', 'heads', 'kv'), use_bias=self.use_bias,
                                     kernel_init=normal_or_default(self.init_std),
                                     dtype=self.dtype, name=name)
    # stacking the kernels copies 3 d^2 floats a call, against the matmuls' 6 b l d^2 FLOPs: a
    # decoding step of one token would copy the weights to read them once, so it keeps three
    if self.fused_qkv and l > 1:
      weights = [proj(name)(x, weights_only=True) for name in ('query', 'key', 'value')]
      kernel = jnp.stack([w for w, _ in weights], axis=1)                  # [d, 3, n, h]
      bias = jnp.stack([bias for _, bias in weights]) if self.use_bias else None   # [3, n, h]
      qkv = matmuls.einsum('bld,dtnh->bltnh', x, kernel, self.dtype, bias=bias)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                    # [b, l, n, h]
    else:
      q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)         # [b, l, n, h]
    q = sharding.shard(q, ('act_batch', 'act_len', 'act_heads', None))
    k = sharding.shard(k, ('act_batch', 'act_len', 'act_heads', None))
    v = sharding.shard(v, ('act_batch', 'act_len', 'act_heads', None))

    if self.decode:
      out = self._decode(q, k, v)
    else:
      out = attend(q, k, v, causal=self.causal, impl=self.impl)
    out = sharding.shard(out, ('act_batch', 'act_len', 'act_heads', None))
    return DenseGeneral(d, ('heads', 'kv', 'embed'), num_contract=2, use_bias=self.use_bias,
                        kernel_init=normal_or_default(self.out_init_std), dtype=self.dtype,
                        name='out')(out)

  def _decode(self, q, k, v):
    initialised = self.has_variable('cache', 'cached_key')
    ck = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
    cv = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
    index = self.variable('cache', 'cache_index', lambda: jnp.array(0, jnp.int32))
    if not initialised:  # init call only sizes the cache
      return attend(q, k, v, causal=True, impl=self.impl)
    l, max_len = q.shape[1], ck.value.shape[1]
    i = index.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
    index.value = i + l
    # query at absolute position i + t may see keys 0 .. i + t; unwritten slots lie beyond that
    mask = (i + jnp.arange(l))[:, None] >= jnp.arange(max_len)[None, :]
    # the fused kernels take no explicit mask
    impl = 'einsum' if self.impl in ('cudnn', 'splash') else self.impl
    return attend(q, ck.value.astype(q.dtype), cv.value.astype(q.dtype),
                  mask[None, None], impl=impl)
