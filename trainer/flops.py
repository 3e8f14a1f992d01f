"""Throughput accounting: TFLOP/s per device and model FLOPs utilisation (MFU).

  train FLOPs per example = 3 x forward matmul FLOPs (backward costs twice the forward),
                            forward counted exactly by models/*.flops_per_example (2 per MAC)
  tflops_per_device       = train FLOPs per example x examples per second / devices / 1e12
  mfu                     = tflops_per_device / peak of the device

The peak is the dense bf16 datasheet number of a GPU or TPU (PEAK_BF16_TFLOPS); a CPU has no
datasheet number worth the name, so there it is measured: measure_matmul_tflops, the best rate of
a square matmul in the compute dtype (16-bit operands accumulating in float32: peak_matmul).
Recomputation under remat is not counted: MFU measures useful model work, not hardware work.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (non-sparse) bf16 peak TFLOP/s per device, from the vendors' datasheets.
PEAK_BF16_TFLOPS = {
    'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'GH200': 989.0, 'B200': 2250.0,
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v6': 918.0,
}


FULL_ATTENTION = 'full l x l'
CAUSAL_TRIANGLE = 'causal triangle (fused kernel)'


def counted_forward_flops(model, flops_per_example: int, seq_len: int) -> tuple[int, str]:
  """(forward FLOPs per example as the step computes them, what the attention term counts).

  A causal model (models/gpt.GPT) whose attention runs a fused kernel ('cudnn', 'splash', or
  'auto' where layers/attentions.auto_kernel takes one, its gradient traced) skips the masked
  triangle that models/*.flops_per_example counts: it is left out here, so that MFU measures
  what the kernel computes (docs/BENCHMARK.md; splash's blocks on the diagonal, computed whole,
  are not counted, so its MFU errs low). Everything else keeps the analytic count."""
  from layers import attentions
  from models import gpt
  impl = getattr(model, 'attention_impl', None)
  if not isinstance(model, gpt.GPT) or impl not in ('cudnn', 'splash', 'auto'):
    return flops_per_example, FULL_ATTENTION
  if impl == 'auto':
    q = jax.ShapeDtypeStruct((1, seq_len, model.heads, model.hidden // model.heads), model.dtype)
    if attentions.auto_kernel(q, q, q, causal=True)[0] is None:   # none, or it refused
      return flops_per_example, FULL_ATTENTION
  skipped = gpt.causal_skipped_flops(seq_len, model.hidden, model.depth)
  return flops_per_example - skipped, CAUSAL_TRIANGLE


def peak_tflops(device_kind: str) -> float | None:
  """Peak for a `jax.Device.device_kind` string, None where unknown (CPUs, say)."""
  kind = device_kind.upper()
  for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # 'GH200' before 'H200'
    if name.upper() in kind:
      return PEAK_BF16_TFLOPS[name]
  return None


def train_tflops_per_device(forward_flops_per_example: int, examples_per_s: float,
                            num_devices: int) -> float:
  return 3.0 * forward_flops_per_example * examples_per_s / num_devices / 1e12


def peak_matmul(dtype):
  """The jitted matmul measure_matmul_tflops times: 16-bit operands accumulate in and return
  float32, as the models' matmuls do (layers/matmuls.py). XLA's CPU backend runs only that form
  on its native bfloat16 kernels; a bfloat16 -> bfloat16 matmul it widens to float32, and
  timing one made the bfloat16 "peak" the float32 rate (docs/PERFORMANCE.md)."""
  if jnp.dtype(dtype).itemsize >= 4:
    return jax.jit(jnp.matmul)
  return jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))


def measure_matmul_tflops(dtype='float32', n: int = 2048, repeats: int = 5,
                          device=None) -> float:
  """TFLOP/s of one jitted [n, n] @ [n, n] matmul on `device` (default: jax.devices()[0]).

  2 n^3 FLOPs divided by the best of `repeats` timed calls, each blocked on, after two untimed
  calls (the first compiles). The best rather than the median: on a shared machine neighbours
  only ever slow a call down, so the fastest call is the closest to what the device can do.
  `dtype` is the compute dtype of the work it is compared with ('float32' or 'bfloat16'). With
  several fake CPU devices on one host, this is one device's matmul while the others idle, so it
  can use more of the host than each device gets when all of them run a step at once.
  """
  device = device or jax.devices()[0]
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(rng.standard_normal((n, n)).astype(jnp.dtype(dtype)), device)
          for _ in range(2))
  matmul = peak_matmul(dtype)
  for _ in range(2):
    matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best / 1e12
