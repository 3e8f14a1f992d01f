"""How many JAX devices a CPU host is split into, decided once before any backend starts.

XLA's CPU backend runs a matmul on all of the host's cores, but its small elementwise fusions
(a LayerNorm, a GELU, a softmax; only the largest are split) on one thread.
A step made of small matrices therefore leaves cores idle. Splitting the host into N devices
and sharding the batch over them runs N copies of every such fusion at once: the small ViT's
step on 2 cores is 1.5-1.6x faster on 2 devices (docs/PERFORMANCE.md), while a matmul-bound
step gains nothing. Experiments ask for it with the `CPU_DEVICES` knob; GPUs and TPUs ignore it.
"""
from __future__ import annotations

import os
import re

_FLAG = re.compile(r'--xla_force_host_platform_device_count=(\d+)')
_applied = None   # the count configure() itself set: not a choice made elsewhere


def chosen_by_environment() -> str | None:
  """What already fixes the CPU device count, or None: an XLA_FLAGS device count, or JAX's
  `jax_num_cpu_devices` (set from JAX_NUM_CPU_DEVICES when JAX is imported, or by
  `jax.config.update` since, as a notebook or a tool might)."""
  m = _FLAG.search(os.environ.get('XLA_FLAGS', ''))
  if m:
    return f'XLA_FLAGS {m.group(0)}'
  import jax
  n = jax.config.jax_num_cpu_devices
  if n > 0 and n != _applied:
    return (f'JAX_NUM_CPU_DEVICES={n}' if os.environ.get('JAX_NUM_CPU_DEVICES') == str(n)
            else f'jax_num_cpu_devices={n}')
  return None


def configure(count: int) -> str:
  """Split the CPU backend into `count` devices, unless the environment has chosen already
  (the user's XLA_FLAGS, JAX_NUM_CPU_DEVICES or jax.config win, so tests and multi-host launches
  keep theirs). Call before JAX starts a backend. Returns one line saying what decided."""
  if count < 1:
    raise ValueError(f'CPU_DEVICES={count} must be at least 1')
  import jax
  from jax._src import xla_bridge   # no public query for "has a backend started" in jax 0.10
  env = chosen_by_environment()
  if env:
    return f'CPU devices as the environment sets them ({env}); CPU_DEVICES={count} not applied'
  if xla_bridge.backends_are_initialized():
    have = len(jax.devices('cpu'))
    if have != count:
      raise RuntimeError(f'CPU_DEVICES={count}, but JAX already started its CPU backend with '
                         f'{have} device(s); set it before the first JAX computation')
    return f'CPU split into {count} device(s) (already so)'
  global _applied
  jax.config.update('jax_num_cpu_devices', count)
  _applied = count
  return f'CPU split into {count} device(s) (CPU_DEVICES)'
