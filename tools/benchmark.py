"""Time the train step of an experiment on synthetic batches: step time, throughput, MFU, memory.

    python tools/benchmark.py --exp=DiT_XL_Synthetic [--set KNOB=VALUE ...] [--steps 10]
        [--warmup 2] [--out result.json] [--table] [--peak_tflops X]
    python tools/benchmark.py --exp=ViT_T_Synthetic --compare "" "HIDDEN=32" [--out cmp.json]
    python tools/benchmark.py --summarize a.json b.json ...     # one Markdown table of results

Only the model, the task, the optimizer and the loop settings of the experiment are built: no
data source is, so an experiment whose data is not on this machine benchmarks too. The batch is
random (normal images with random labels, or random tokens) with the shapes the task trains on,
made once on the devices, so the host-to-device copy of the real loop is not timed. Mesh,
sharded init and the train step are those of trainer/loop.py: eval_shape of the init ->
logical shardings (layers/sharding.py) -> jit of the init with out_shardings; the step is jitted
with the state donated, compiled ahead of time (compile_time_s), run `--warmup` times, then
`--steps` times with a block after each step (median and mean step time), then `--steps` times
more with one block at the end (step_time_pipelined_s: dispatch overlapping compute, as in the
loop). MFU is against the datasheet peak of a GPU or TPU; on a CPU, against the machine's own
matmul rate in the compute dtype, measured before and after the timed steps (trainer/flops.py).
docs/BENCHMARK.md says what each output field means.

Machines are shared and noisy: compare variants from the same run, not across runs. --compare
does that in one process: every variant compiled, then timed in alternating rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Knobs copied into the result so a table row says what ran (those an experiment lacks are left
# out).
REPORTED_KNOBS = ('DTYPE', 'ATTENTION_IMPL', 'REMAT', 'SCAN_LAYERS', 'SCAN_UNROLL',
                  'RESIDUAL_DTYPE', 'HIDDEN', 'DEPTH', 'HEADS', 'PATCH', 'IMAGE_SIZE', 'SEQ_LEN',
                  'MESH', 'USE_VAE', 'LATENTS_DIR', 'LOSS_CHUNK', 'LOSS_VOCAB_BLOCK')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--exp', help='experiment class name (or module.path.ClassName)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='KNOB=VALUE or dotted.config.path=VALUE, as launch.py; repeatable')
  p.add_argument('--steps', type=int, default=10, help='timed steps (default 10)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling (default 2)')
  p.add_argument('--out', help='also write the JSON result to this file')
  p.add_argument('--table', action='store_true',
                 help='print a Markdown table (header and one row) instead of the JSON')
  p.add_argument('--no_header', action='store_true', help='with --table: the row alone')
  p.add_argument('--summarize', nargs='+', metavar='JSON',
                 help='print one Markdown table of earlier results (files of one result or a '
                      'list of them) and exit; nothing is run')
  p.add_argument('--cpu_devices', type=int, default=0,
                 help='on the CPU backend, split the host into this many devices, whatever the '
                      'experiment\'s CPU_DEVICES knob says (default: that knob)')
  p.add_argument('--seed', type=int, default=0, help='seed of the synthetic batch')
  p.add_argument('--random_vae', action='store_true',
                 help='with USE_VAE: a random VAE of the Stable Diffusion architecture instead '
                      'of VAE_PATH (the step time does not depend on the weights)')
  p.add_argument('--compare', nargs='+', metavar='"KNOB=V ..."',
                 help='two or more variants, each a space-separated list of overrides on top of '
                      'the --set ones ("" for none): all compiled in this process, then timed '
                      'in alternating rounds; prints a Markdown table with each variant\'s '
                      'speed relative to the first; --out gets every result and the ratios')
  p.add_argument('--profile', metavar='DIR',
                 help='after the timed steps, trace 3 more with jax.profiler into DIR (a '
                      'TensorBoard profile and a perfetto_trace.json.gz that '
                      'tools/profile_summary.py reads); not with --compare')
  p.add_argument('--peak_tflops', type=float,
                 help='peak TFLOP/s per device for MFU, instead of the datasheet table (GPU, '
                      'TPU) or the measured matmul rate (CPU)')
  args = p.parse_args(argv)
  if not args.summarize and not args.exp:
    p.error('--exp is required (or --summarize)')
  if args.steps < 1 or args.warmup < 0:
    p.error('--steps must be >= 1 and --warmup >= 0')
  if args.compare is not None and len(args.compare) < 2:
    p.error('--compare needs two or more variants (use "" for the --set settings alone)')
  if args.profile and args.compare is not None:
    p.error('--profile traces one variant: drop --compare or --profile')
  if args.peak_tflops is not None and not args.peak_tflops > 0:
    p.error('--peak_tflops must be positive')
  return args


# ------------------------------------------------------------------ synthetic batch ------------
def batch_spec(task, model, global_batch: int, codec=None, exp=None) -> dict:
  """{key: (shape, dtype, kind, upper bound)} of a training batch of `task`.

  Language tasks ('tokens' [b, seq_len + 1] int32 < vocab) are told apart from image tasks
  ('image' [b, H, W, C] float32, 'label' [b] int32 < num_classes) by their init inputs. With a
  codec (a latent DiT) the batch holds what its data source yields: pixel images of the
  experiment's IMAGE_SIZE, or with LATENTS_DIR set, posterior 'moments' [b, h, w, 2c].
  """
  import jax.numpy as jnp
  if codec is not None:
    labels = ((global_batch,), jnp.int32, 'int', int(task.num_classes))
    if getattr(exp, 'LATENTS_DIR', None):
      shape = (global_batch, task.image_size, task.image_size, 2 * task.channels)
      return {'moments': (shape, jnp.float32, 'normal', None), 'label': labels}
    size, channels = exp.IMAGE_SIZE, codec.model.config.in_channels
    return {'image': ((global_batch, size, size, channels), jnp.float32, 'normal', None),
            'label': labels}
  first = task.init_inputs(global_batch)[0]
  if jnp.issubdtype(first.dtype, jnp.integer) and first.ndim == 2:
    vocab = getattr(model, 'vocab_size', None)
    if not vocab:
      raise ValueError(f'{type(model).__name__} has no vocab_size for random tokens')
    b, l = first.shape
    return {'tokens': ((b, l + 1), jnp.int32, 'int', int(vocab))}
  if first.ndim == 4 and hasattr(task, 'num_classes'):
    return {'image': (tuple(first.shape), jnp.float32, 'normal', None),
            'label': ((first.shape[0],), jnp.int32, 'int', int(task.num_classes))}
  raise ValueError(f'no synthetic batch for task {type(task).__name__} (init inputs '
                   f'{first.shape} {first.dtype}); benchmark.batch_spec knows image and token '
                   'tasks')


def make_batch(spec: dict, key, sharding):
  """The batch, drawn on the devices straight into the batch sharding."""
  import jax

  def draw(key):
    out = {}
    for i, (name, (shape, dtype, kind, high)) in enumerate(sorted(spec.items())):
      k = jax.random.fold_in(key, i)
      if kind == 'normal':
        out[name] = jax.random.normal(k, shape, dtype)
      else:
        out[name] = jax.random.randint(k, shape, 0, high, dtype)
    return out

  return jax.jit(draw, out_shardings=sharding)(key)


# ------------------------------------------------------------------ helpers --------------------
def _first_dict(x):
  """cost_analysis / memory stats come as a dict or a one-element list, depending on jax."""
  if isinstance(x, (list, tuple)):
    x = x[0] if x else None
  return x if isinstance(x, dict) else None


def xla_flops(compiled) -> float | None:
  try:
    cost = _first_dict(compiled.cost_analysis())
  except Exception:  # not every backend implements it
    return None
  flops = cost.get('flops') if cost else None
  return float(flops) if flops and flops > 0 else None


def compiled_memory(compiled) -> dict | None:
  """XLA's per-device memory plan of the step (bytes), where the backend reports one."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  out = {f.replace('_size_in_bytes', '_bytes'): int(getattr(m, f)) for f in fields
         if hasattr(m, f)}
  return out or None


def peak_memory_bytes(devices) -> int | None:
  """Largest `peak_bytes_in_use` over the local devices; None where not reported (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def versions() -> dict:
  import importlib.metadata as md
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'fiddle'):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      out[name] = None
  return out


# ------------------------------------------------------------------ the benchmark --------------
@dataclasses.dataclass
class Prepared:
  """One variant of an experiment built, initialised on its mesh and compiled: ready to time.

  The compiled step donates the state, so step() keeps the state it returns; calling `compiled`
  on an older state fails (its buffers are gone). Several of these can live at once (--compare):
  each holds its own state, batch and frozen weights, so each takes its own device memory.
  """
  exp_name: str            # as given to --exp
  overrides: list          # every KNOB=VALUE applied, in order (--set first, then a variant's)
  exp: Any                 # the Experiment instance, overrides applied (its knobs)
  model: Any               # the built model (flax Module)
  settings: Any            # its LoopSettings: global_batch, flops_per_example, tokens_per_example
  mesh: Any                # the jax.sharding.Mesh the state and batch are sharded over
  compiled: Any            # the train step compiled ahead of time: (state, batch, frozen) ->
                           # (state, metrics)
  state: Any               # the current TrainState; replaced by every step
  batch: dict              # the synthetic batch, made once and reused by every step
  frozen: Any              # the frozen codec's weights (a latent DiT's VAE), else None
  param_count: int         # trainable parameters (not the EMA copy or optimizer moments)
  init_time_s: float       # sharded init, its compile included
  compile_time_s: float    # lowering + compiling the step
  random_vae: bool = False  # --random_vae: a random VAE stands in for VAE_PATH's weights
  metrics: Any = None      # the last step's metrics (None before the first)
  fused_attention: tuple = ()  # the fused attention kernels the lowered step calls, by name

  @property
  def dtype(self) -> str:
    """The compute dtype, which the CPU's matmul rate is measured in."""
    return str(getattr(self.exp, 'DTYPE', 'float32'))

  def step(self):
    self.state, self.metrics = self.compiled(self.state, self.batch, self.frozen)

  def block(self):
    import jax
    jax.block_until_ready((self.state, self.metrics))

  def timed_step(self) -> float:
    """Seconds of one step, dispatch to finished (blocked on)."""
    t0 = time.perf_counter()
    self.step()
    self.block()
    return time.perf_counter() - t0

  def timed_pipelined(self, steps: int) -> float:
    """Seconds per step of `steps` steps dispatched back to back and blocked on once at the end:
    dispatch overlaps compute, as in the training loop."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.step()
    self.block()
    return (time.perf_counter() - t0) / steps


def prepare(exp_name: str, overrides=(), seed: int = 0, log=print,
            random_vae: bool = False) -> Prepared:
  """Build the experiment's model, task, optimizer and loop settings, then mesh, sharded state,
  synthetic batch and the compiled step, as trainer/loop.py makes them."""
  import fiddle as fdl
  import jax
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P

  from experiments import base
  from layers import attentions, sharding
  from trainer import state as state_lib

  from trainer import host_devices

  exp, cfg = base.build_config(exp_name, list(overrides))
  try:
    log(host_devices.configure(exp.CPU_DEVICES))   # the split launch.py would make, unless set
  except RuntimeError as e:
    raise RuntimeError(f'{e}. One benchmark process keeps one device count: compare CPU_DEVICES '
                       'values in separate runs, each with --cpu_devices N') from e
  model, task = fdl.build(cfg.model), fdl.build(cfg.task)
  opt, s = fdl.build(cfg.optimizer), fdl.build(cfg.loop)
  tx, lr_fn = opt.tx, opt.lr
  devices = jax.devices()
  codec = None
  if cfg.codec is not None:   # a latent DiT: its frozen VAE runs inside the step
    from models import vae
    codec = (vae.PretrainedVAE.random(vae.SD_VAE_CONFIG, exp.DTYPE) if random_vae
             else fdl.build(cfg.codec))

  # ---------------------------------------------------------------- mesh (trainer/state.py)
  mesh = sharding.make_mesh(s.mesh)
  rules = sharding.DEFAULT_RULES
  batch_sharding = state_lib.batch_sharding(mesh, s.global_batch)
  replicated = NamedSharding(mesh, P())

  # ---------------------------------------------------------------- state (trainer/state.py)
  init_state = state_lib.make_init_state(model, task, tx, s.ema_decay)
  train_step = state_lib.make_train_step(model, task, tx, lr_fn, s.ema_decay, codec, mesh,
                                         s.grad_sync)
  key = jax.random.key(s.seed)
  state_shardings, _ = state_lib.shard_state(init_state, key, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    state = state_lib.initialize(init_state, key, state_shardings)
    jax.block_until_ready(state)
    init_time = time.perf_counter() - t0
    n_params = state_lib.count_params(state.params)
    spec = batch_spec(task, model, s.global_batch, codec, exp)
    batch = make_batch(spec, jax.random.key(seed + 12345), batch_sharding)
    frozen, frozen_shardings = state_lib.place_frozen(codec, mesh, rules)
    log(f'{" ".join([exp_name, *overrides])}: {n_params:,} params, batch {s.global_batch}, '
        f'mesh {dict(mesh.shape)} on {len(devices)} x {devices[0].device_kind}; compiling')

    step_fn = jax.jit(train_step,
                      in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch, frozen)
    compiled = lowered.compile()
    compile_time = time.perf_counter() - t0
    fused = tuple(sorted(attentions.fused_kernels_in(lowered.as_text())))
  log(f'compiled in {compile_time:.1f} s')
  return Prepared(exp_name=exp_name, overrides=list(overrides), exp=exp, model=model,
                  settings=s, mesh=mesh,
                  compiled=compiled, state=state, batch=batch, frozen=frozen,
                  param_count=n_params, init_time_s=init_time, compile_time_s=compile_time,
                  random_vae=random_vae, fused_attention=fused)


# CPU peak: one [n, n] matmul of this size (trainer/flops.py), measured before and after the
# timed steps. 2048 takes about 0.15 s a call on two cores in float32: big enough to reach the
# machine's rate, small enough that both measurements together cost a few seconds.
MATMUL_N = 2048


def matmul_rates(dtypes, peak_override=None) -> dict:
  """{dtype: TFLOP/s of trainer.flops.measure_matmul_tflops on jax.devices()[0]} on the CPU
  backend; {} elsewhere (GPUs and TPUs have datasheet peaks) or when --peak_tflops is given."""
  import jax
  from trainer import flops
  if peak_override or jax.default_backend() != 'cpu':
    return {}
  return {d: flops.measure_matmul_tflops(d, MATMUL_N) for d in sorted(set(dtypes))}


def peak_fields(dtype: str, before: dict, after: dict, peak_override=None) -> dict:
  """The peak a result's MFU is against, where it comes from, and the CPU's matmul rates."""
  import jax
  from trainer import flops
  if peak_override:
    peak, source = float(peak_override), '--peak_tflops'
  elif dtype in before:
    # The larger of the two: a shared machine only slows a measurement down.
    peak = max(before[dtype], after[dtype])
    source = f'measured matmul n={MATMUL_N} {dtype}'
  else:
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    source = 'datasheet' if peak else None
  return {'peak_tflops_per_device': peak, 'peak_source': source,
          'matmul_tflops_before': before.get(dtype), 'matmul_tflops_after': after.get(dtype)}


def resolved_knobs(p: Prepared) -> dict:
  """What the model decided for knobs left to it (None): GPT's loss chunk, which follows the
  device's memory, and its vocabulary block, which follows the backend (models/gpt.py)."""
  import jax
  from flax import linen as nn
  from layers import sharding
  model, out = p.model, {}
  if hasattr(model, 'chunk_for') and getattr(p.exp, 'LOSS_CHUNK', 0) is None:
    with jax.set_mesh(p.mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
      out['LOSS_CHUNK'] = model.chunk_for(p.settings.global_batch, p.settings.tokens_per_example)
  if hasattr(model, 'streamed_vocab_block') and getattr(p.exp, 'LOSS_VOCAB_BLOCK', 0) is None:
    out['LOSS_VOCAB_BLOCK'] = model.streamed_vocab_block
  return out


def make_result(p: Prepared, times, pipelined: float, warmup: int, peak: dict) -> dict:
  """The JSON result of one timed variant (docs/BENCHMARK.md lists the fields)."""
  import jax
  import numpy as np
  from trainer import allocator, flops

  devices, s = jax.devices(), p.settings
  step_time = statistics.median(times)
  examples_per_s = s.global_batch / step_time
  n_dev = len(devices)
  per_example, attention_counted = flops.counted_forward_flops(p.model, s.flops_per_example,
                                                              s.tokens_per_example)
  if attention_counted == flops.CAUSAL_TRIANGLE and not p.fused_attention:
    # no fused kernel in the step after all (one run by Pallas's interpreter off a TPU, say):
    # the whole matrix ran
    per_example, attention_counted = s.flops_per_example, flops.FULL_ATTENTION
  tflops = flops.train_tflops_per_device(per_example, examples_per_s, n_dev)
  xla = xla_flops(p.compiled)
  loss = float(jax.device_get(p.metrics['loss']))
  knobs = {k: getattr(p.exp, k) for k in REPORTED_KNOBS if hasattr(p.exp, k)}
  knobs.update(resolved_knobs(p))
  return {
      'experiment': p.exp_name,
      'overrides': p.overrides + (['--random_vae'] if p.random_vae else []),
      'knobs': knobs,
      'devices': {'count': n_dev, 'kind': devices[0].device_kind,
                  'processes': jax.process_count()},
      'platform': jax.default_backend(),
      'jax_version': jax.__version__,
      'versions': versions(),
      'mesh': {k: int(v) for k, v in p.mesh.shape.items()},
      'global_batch': s.global_batch,
      'steps': len(times),
      'warmup': warmup,
      'step_time_s': step_time,
      'step_time_mean_s': statistics.fmean(times),
      'step_time_min_s': min(times),
      'step_time_max_s': max(times),
      'step_time_pipelined_s': pipelined,
      'step_times_s': list(times),
      'examples_per_s': examples_per_s,
      'tokens_per_s': examples_per_s * s.tokens_per_example if s.tokens_per_example else None,
      'flops_per_example': per_example,
      'attention_flops': attention_counted,
      'fused_attention': list(p.fused_attention),
      'host_allocator': allocator.describe(),
      'tflops_per_device': tflops,
      **peak,
      'mfu': tflops / peak['peak_tflops_per_device'] if peak['peak_tflops_per_device'] else None,
      'xla_tflop_per_step_per_device': xla / 1e12 if xla else None,
      'peak_memory_bytes': peak_memory_bytes(jax.local_devices()),
      'compiled_memory': compiled_memory(p.compiled),
      'param_count': p.param_count,
      'init_time_s': p.init_time_s,
      'compile_time_s': p.compile_time_s,
      'loss': loss,
      'loss_finite': bool(np.isfinite(loss)),
      'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def run_benchmark(exp_name: str, overrides=(), steps: int = 10, warmup: int = 2,
                  seed: int = 0, log=print, random_vae: bool = False,
                  peak_tflops: float | None = None, profile_dir: str | None = None) -> dict:
  """One variant: prepare, `warmup` steps, then `steps` blocked steps and `steps` pipelined;
  with `profile_dir`, 3 more steps traced there (after the timings, so tracing costs them
  nothing)."""
  p = prepare(exp_name, overrides, seed, log, random_vae)
  log(f'{warmup} warm-up + 2 x {steps} timed steps')
  for _ in range(warmup):
    p.step()
  p.block()
  before = matmul_rates([p.dtype], peak_tflops)
  times = [p.timed_step() for _ in range(steps)]
  pipelined = p.timed_pipelined(steps)
  after = matmul_rates([p.dtype], peak_tflops)
  peak = peak_fields(p.dtype, before, after, peak_tflops)
  result = make_result(p, times, pipelined, warmup, peak)
  if profile_dir:
    import jax
    log(f'tracing 3 steps into {profile_dir}')
    try:
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(3):
          p.step()
        p.block()
      result['profile_dir'] = os.path.abspath(profile_dir)
    except Exception as e:  # noqa: BLE001 -- the timings above stand without the trace
      traceback.print_exc()
      result['profile_error'] = f'{type(e).__name__}: {e}'
  return result


def run_compare(exp_name: str, overrides=(), variants=(), steps: int = 10, warmup: int = 2,
                seed: int = 0, log=print, random_vae: bool = False,
                peak_tflops: float | None = None) -> dict:
  """Several variants of one experiment in one process, timed alternately.

  Every variant is prepared (all live at once), then warmed up, then timed in `steps` rounds of
  one blocked step each, so a slow spell of a shared machine hits every variant alike. Each
  round starts one variant further along (A B C, B C A, ...), so none always runs first or
  right after the same neighbour. The pipelined times follow, one variant after the other.
  A variant that fails to build or compile is a result with an 'error' and no ratio.
  """
  variant_overrides = [list(overrides) + shlex.split(v) for v in variants]
  prepared, errors = [], {}
  for i, vo in enumerate(variant_overrides):
    try:
      prepared.append(prepare(exp_name, vo, seed, log, random_vae))
    except Exception as e:  # a bad knob or an OOM in one variant: report it, time the rest
      traceback.print_exc()
      prepared.append(None)
      errors[i] = f'{type(e).__name__}: {e}'
  live = [p for p in prepared if p is not None]
  log(f'{len(live)} variants: {warmup} warm-up + {steps} timed rounds, then '
      f'{steps} pipelined steps each')
  for _ in range(warmup):
    for p in live:
      p.step()
  for p in live:
    p.block()
  before = matmul_rates([p.dtype for p in live], peak_tflops)
  times = [[] for _ in live]
  for r in range(steps):
    for k in range(len(live)):
      i = (r + k) % len(live)
      times[i].append(live[i].timed_step())
  pipelined = [p.timed_pipelined(steps) for p in live]
  after = matmul_rates([p.dtype for p in live], peak_tflops)

  results, k = [], 0
  for i, p in enumerate(prepared):
    if p is None:
      results.append({'experiment': exp_name, 'overrides': variant_overrides[i],
                      'error': errors[i]})
      continue
    peak = peak_fields(p.dtype, before, after, peak_tflops)
    results.append(make_result(p, times[k], pipelined[k], warmup, peak))
    k += 1
  first = results[0].get('step_time_s')
  # Speed relative to the first variant: > 1 is faster. Step times, not examples/s: with
  # different GLOBAL_BATCH variants, compare examples_per_s instead.
  ratios = [first / r['step_time_s'] if first and 'step_time_s' in r else None for r in results]
  return {'experiment': exp_name, 'overrides': list(overrides), 'variants': list(variants),
          'rounds': steps, 'warmup': warmup, 'results': results, 'speed_vs_first': ratios}


# ------------------------------------------------------------------ tables ---------------------
COLUMNS = ('experiment', 'settings', 'devices', 'batch', 'step ms', 'pipelined ms', 'examples/s',
           'tokens/s', 'TFLOP/s/dev', 'MFU', 'peak GiB', 'params', 'compile s')


def _fmt(x, spec):
  """`spec` as format(); 'auto' gives 3 significant digits below 10 and one decimal above."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return '-'
  if spec == 'auto':
    spec = '.3g' if abs(x) < 10 else '.1f'
  return format(x, spec)


def table_row(r: dict) -> str:
  settings = ' '.join(r.get('overrides') or []) or 'defaults'
  if 'error' in r:
    cells = [r.get('experiment', '?'), settings, 'FAILED: ' + r['error'].splitlines()[0][:120]]
    cells += [''] * (len(COLUMNS) - len(cells))
  else:
    dev = r['devices']
    peak = r.get('peak_memory_bytes')
    cells = [r['experiment'], settings, f"{dev['count']}x {dev['kind']}", str(r['global_batch']),
             _fmt(1e3 * r['step_time_s'], '.1f'), _fmt(1e3 * r['step_time_pipelined_s'], '.1f'),
             _fmt(r['examples_per_s'], ',.1f'), _fmt(r.get('tokens_per_s'), ',.0f'),
             _fmt(r['tflops_per_device'], 'auto'),
             '-' if r.get('mfu') is None else f"{100 * r['mfu']:.1f}%",
             '-' if peak is None else f'{peak / 2**30:.1f}',
             f"{r['param_count'] / 1e6:.1f}M", _fmt(r['compile_time_s'], '.1f')]
  return '| ' + ' | '.join(c.replace('|', '/') for c in cells) + ' |'


def table_header() -> str:
  return ('| ' + ' | '.join(COLUMNS) + ' |\n|' + '|'.join(
      ' --- ' if i < 2 else ' ---: ' for i in range(len(COLUMNS))) + '|')


def load_results(paths) -> list[dict]:
  """Results from files of one result, a list of them, or a --compare report."""
  out = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    if isinstance(data, dict) and 'results' in data:
      data = data['results']
    out.extend(data if isinstance(data, list) else [data])
  return out


def markdown_table(results) -> str:
  return '\n'.join([table_header(), *(table_row(r) for r in results)])


COMPARE_COLUMNS = ('variant', 'batch', 'step ms', 'examples/s', 'TFLOP/s/dev', 'MFU',
                   'compile s', 'speed vs first')


def compare_table(report: dict) -> str:
  """One row per --compare variant; the last column is the first variant's median step time
  over this one's (above 1: faster than the first)."""
  lines = ['| ' + ' | '.join(COMPARE_COLUMNS) + ' |',
           '|' + '|'.join(' --- ' if i == 0 else ' ---: ' for i in range(len(COMPARE_COLUMNS)))
           + '|']
  for variant, r, ratio in zip(report['variants'], report['results'],
                               report['speed_vs_first']):
    name = variant.strip() or '(as --set)'
    if 'error' in r:
      cells = [name, 'FAILED: ' + r['error'].splitlines()[0][:120]]
      cells += [''] * (len(COMPARE_COLUMNS) - len(cells))
    else:
      cells = [name, str(r['global_batch']), _fmt(1e3 * r['step_time_s'], '.1f'),
               _fmt(r['examples_per_s'], ',.1f'), _fmt(r['tflops_per_device'], 'auto'),
               '-' if r.get('mfu') is None else f"{100 * r['mfu']:.1f}%",
               _fmt(r['compile_time_s'], '.1f'), '-' if ratio is None else f'{ratio:.3f}x']
    lines.append('| ' + ' | '.join(c.replace('|', '/') for c in cells) + ' |')
  return '\n'.join(lines)


# ------------------------------------------------------------------ main -----------------------
def main(argv=None) -> int:
  args = parse_args(argv)
  if args.summarize:
    print(markdown_table(load_results(args.summarize)))
    return 0
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import jax
  if args.cpu_devices:   # as the environment would: it overrides the experiment's CPU_DEVICES
    jax.config.update('jax_num_cpu_devices', args.cpu_devices)  # before any backend starts
  log = lambda msg: print(f'[benchmark] {msg}', file=sys.stderr, flush=True)
  try:
    if args.compare:
      result = run_compare(args.exp, args.set, args.compare, args.steps, args.warmup, args.seed,
                           log, args.random_vae, args.peak_tflops)
      status = int(any('error' in r for r in result['results']))
    else:
      result = run_benchmark(args.exp, args.set, args.steps, args.warmup, args.seed, log,
                             args.random_vae, args.peak_tflops, args.profile)
      status = 0
  except Exception as e:  # a failed variant is a result too (OOM, bad knob): say which and why
    traceback.print_exc()
    result = {'experiment': args.exp, 'overrides': list(args.set),
              'error': f'{type(e).__name__}: {e}'}
    if args.compare:
      result['variants'] = list(args.compare)
    status = 1
  text = json.dumps(result, indent=2)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(text + '\n')
  if args.compare:
    print(compare_table(result) if 'results' in result else text)
  elif args.table:
    print(table_row(result) if args.no_header else markdown_table([result]))
  else:
    print(text)
  return status


if __name__ == '__main__':
  from trainer import allocator
  allocator.reexec()   # time the step with the allocator launch.py trains with
  sys.exit(main())
