"""Throughput accounting: TFLOP/s per device and model FLOPs utilisation (MFU).

  train FLOPs per example = 3 x forward matmul FLOPs (backward costs twice the forward),
                            forward counted exactly by models/*.flops_per_example (2 per MAC)
  tflops_per_device       = train FLOPs per example x examples per second / devices / 1e12
  mfu                     = tflops_per_device / dense bf16 peak of the device

Recomputation under remat is not counted: MFU measures useful model work, not hardware work.
"""
from __future__ import annotations

# Dense (non-sparse) bf16 peak TFLOP/s per device, from the vendors' datasheets.
PEAK_BF16_TFLOPS = {
    'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'GH200': 989.0, 'B200': 2250.0,
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0, 'TPU v6': 918.0,
}


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
