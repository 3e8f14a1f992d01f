"""Our train step against the public reference backbone kvfrans/jaxtransformer, side by side.

    python tools/reference_bench.py --reference_dir=REF [--family dit|vit|gpt|all] [--steps 5]
        [--warmup 2] [--set KNOB=VALUE ...] [--reference_dtype float32|bfloat16] [--out r.json]
        [--profile_dir DIR]

REF is a checkout of https://github.com/kvfrans/jaxtransformer (it has jaxtransformer/ at its
top; written against its commit 6d7972c of 2025-05-28), for example
`git clone https://github.com/kvfrans/jaxtransformer REF`. Only its
`jaxtransformer/transformer.py`, `modalities.py` and `utils/train_state.py` are imported; they
need flax, jax and einops, which requirements.txt already installs (no extra package). The
reference's example scripts (examples/train_*.py) are not run: they parse flags and load data
at import. What they build is rebuilt here from the reference's own modules:

  family  shape (both sides)                                   reference example
  dit     batch 16 of 32x32x4, patch 2, 1000 classes + null,   train_diffusion.py
          adaLN blocks, flow-matching loss (128 t steps)
  vit     batch 32 of 32x32x3, patch 4, 1000 classes,          train_vit.py
          class token, softmax cross-entropy
  gpt     batch 8 x 256 tokens, vocab 50257 (the example's     train_llm.py
          tiktoken GPT-2 vocabulary), causal, untied head

Backbone: hidden 256, depth 6, heads 4, MLP ratio 4 on both sides. The optimizer is each
example's: AdamW (lr 1e-4 after a 1000-step linear warmup, b1 0.9, b2 0.999, weight decay
1e-3, the example's decay mask), no gradient clipping, no EMA (the examples' default
use_ema=0). Our side is the experiment (DiT_T_Synthetic, ViT_T_Synthetic, GPT_T_Synthetic) with
knobs set to that shape and optimizer (OURS below), built by tools/benchmark.py's `prepare`
(experiments.base, then trainer/state.py's sharded init and donated step); `--set` overrides
(SCAN_LAYERS=False, REMAT=..., ATTENTION_IMPL=...) are applied after those.
Our step also keeps what the training loop has: the finite-step guard (jnp.where over the
state), grad and param norms; the reference's step computes grad, update and param norms.

Where the reference differs from its own examples:
  - dtype: the reference casts activations to `global_dtype = bfloat16` (layer norms, the
    patch-embedding conv, embeddings; Dense layers without a dtype promote back to float32).
    `--reference_dtype float32` (the default) sets that module global to float32 so both sides
    compute in float32, as our DTYPE=float32; `bfloat16` runs it as published.
  - DiT's final layer: train_diffusion.py at HEAD calls PatchOutput(patch, channels, hidden)(x, c),
    the adaLN signature it had before commit 180fbf4 removed the adaLN half, so the example does
    not run as published. It is rebuilt here as it was: SiLU + zero-initialised Dense(2d) on c ->
    shift, scale of a bare LayerNorm, then the reference's PatchOutput. Our DiT has the same
    final adaLN layer.
  - the state is donated to the jitted step (the examples do not donate); both sides run on one
    device (the tool refuses a host with more: make one visible, e.g. CUDA_VISIBLE_DEVICES=0)
    with a batch made once on it.

Timing: both steps are compiled, run `--warmup` times each, then `--steps` rounds of one
reference step and one of ours (each blocked on), alternating so that load from other processes
falls on both alike. The table gives medians and ratio = reference ms / our ms (> 1: ours is
faster); the paired ratio is the median over rounds of the two steps' ratio within a round,
steadier where other processes load the machine unevenly. The table also gives each side's
share of the peak tools/benchmark.py takes (on a CPU the larger of the matmul rates measured
before and after the rounds, elsewhere the datasheet's) for the same analytic FLOP count, and
the ceiling that puts on the ratio (share_of_peak). `--profile_dir` then traces
`--profile_steps` more steps of each side and prints where XLA's CPU ops spent the time, by kind
of op and by op (sums of the trace's event durations; on a GPU the trace holds no such events).

Diagnosis of the ViT gap this tool was written for (2 shared CPU cores, float32): in our
unrolled backbone XLA's CPU fusion recomputes the residual stream's cotangent (LayerNorm
backward + residual add) inside each of its consumers, the transposed copies feeding the
weight-gradient dots among them, so each block re-does the blocks above it: fusions of up to
~400 instructions and `copy_bitcast_fusion` at 0.6-1.3 s per step against 0.16-0.33 s in the
reference. The op breakdown above shows it (compare `copy_bitcast_fusion` on the two sides);
SCAN_LAYERS=True avoids it at the cost of the scan's own copies and dynamic slices.

Parameter counts (reference_param_count gives the reference's from its architecture): the DiTs
are identical. Our ViT and GPT have LayerNorm biases (the reference's block norms have a scale
only) and a final norm with scale and bias where the reference's ClassifierOutput norm has
neither; our GPT's output Dense has no bias, and its token table and head are padded to
VOCAB_MULTIPLE rows (50304 for 50257). tests/test_reference_bench.py checks these differences
term by term.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

FAMILIES = ('dit', 'vit', 'gpt')

# The reference's example configs (jaxtransformer/configs.py, examples/train_*.py).
HIDDEN, DEPTH, HEADS, MLP_RATIO = 256, 6, 4, 4
LR, WARMUP, B1, B2, WEIGHT_DECAY = 1e-4, 1000, 0.9, 0.999, 1e-3
NUM_CLASSES = 1000                 # train_diffusion.py and train_vit.py
VOCAB = 50257                      # train_llm.py: the tiktoken GPT-2 vocabulary
DENOISE_STEPS, CLASS_DROPOUT = 128, 0.1
SHAPES = {                         # what each family's batch is, on both sides
    'dit': {'batch': 16, 'image': 32, 'channels': 4, 'patch': 2},
    'vit': {'batch': 32, 'image': 32, 'channels': 3, 'patch': 4},
    'gpt': {'batch': 8, 'seq_len': 256},
}

_OPTIMIZER_KNOBS = (f'LR={LR}', f'WARMUP={WARMUP}', "LR_SCHEDULE='constant'",
                    f'WEIGHT_DECAY={WEIGHT_DECAY}', f'ADAM_B1={B1}', f'ADAM_B2={B2}',
                    'GRAD_CLIP=0.0', 'EMA_DECAY=0.0')
_BACKBONE_KNOBS = (f'HIDDEN={HIDDEN}', f'DEPTH={DEPTH}', f'HEADS={HEADS}',
                   f'MLP_RATIO={float(MLP_RATIO)}', "DTYPE='float32'")
OURS = {   # family -> (experiment, knobs that give it the reference's shape and optimizer)
    'dit': ('DiT_T_Synthetic', _BACKBONE_KNOBS + _OPTIMIZER_KNOBS + (
        'IMAGE_SIZE=32', 'CHANNELS=4', 'PATCH=2', f'NUM_CLASSES={NUM_CLASSES}',
        'GLOBAL_BATCH=16', f'DENOISE_STEPS={DENOISE_STEPS}', f'CLASS_DROPOUT={CLASS_DROPOUT}')),
    'vit': ('ViT_T_Synthetic', _BACKBONE_KNOBS + _OPTIMIZER_KNOBS + (
        'IMAGE_SIZE=32', 'CHANNELS=3', 'PATCH=4', f'NUM_CLASSES={NUM_CLASSES}',
        'GLOBAL_BATCH=32')),
    'gpt': ('GPT_T_Synthetic', _BACKBONE_KNOBS + _OPTIMIZER_KNOBS + (
        'SEQ_LEN=256', f'VOCAB_SIZE={VOCAB}', 'GLOBAL_BATCH=8', 'TIE_EMBEDDINGS=False')),
}


# Our knobs that change the step's speed, copied into the result (those an experiment lacks are
# left out).
REPORTED_KNOBS = ('ATTENTION_IMPL', 'REMAT', 'SCAN_LAYERS', 'SCAN_UNROLL', 'FUSED_QKV',
                  'RESIDUAL_DTYPE', 'TIE_EMBEDDINGS', 'VOCAB_MULTIPLE', 'LOSS_CHUNK')


def ours_overrides(family: str, extra=()) -> tuple[str, list[str]]:
  """(experiment name, --set list) of our side of `family`; `extra` is applied last."""
  exp, knobs = OURS[family]
  return exp, list(knobs) + list(extra)


def reference_param_count(family: str) -> int:
  """The reference model's parameter count, from its architecture (transformer.py, modalities.py
  and the example's model): what build_reference counts, without importing the reference."""
  d, f = HIDDEN, HIDDEN * MLP_RATIO
  dense = lambda i, o: i * o + o                       # flax nn.Dense: kernel and bias
  attn_mlp = 4 * dense(d, d) + dense(d, f) + dense(f, d)
  if family == 'dit':
    p, c = SHAPES['dit']['patch'], SHAPES['dit']['channels']
    block = dense(d, 6 * d) + attn_mlp                 # adaLN modulation; norms have no params
    return (dense(p * p * c, d) + 2 * dense(d, d)     # patch conv; timestep MLP (256 freqs)
            + (NUM_CLASSES + 1) * d + DEPTH * block    # class table with the null class
            + dense(d, 2 * d) + dense(d, p * p * c))   # final adaLN and PatchOutput
  block = attn_mlp + 2 * d                             # two LayerNorms with a scale only
  if family == 'vit':
    p, c = SHAPES['vit']['patch'], SHAPES['vit']['channels']
    return dense(p * p * c, d) + d + DEPTH * block + dense(d, NUM_CLASSES)   # + class token
  if family == 'gpt':
    return VOCAB * d + SHAPES['gpt']['seq_len'] * d + DEPTH * block + dense(d, VOCAB)
  raise ValueError(f'family {family!r}: one of {FAMILIES}')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--reference_dir', required=True,
                 help='a checkout of github.com/kvfrans/jaxtransformer (holds jaxtransformer/)')
  p.add_argument('--family', choices=FAMILIES + ('all',), default='all')
  p.add_argument('--steps', type=int, default=5, help='timed rounds, one step of each side '
                                                      '(default 5)')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps of each side (default 2)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override on our side (after the matching knobs), as launch.py; '
                      'repeatable')
  p.add_argument('--reference_dtype', choices=('float32', 'bfloat16'), default='float32',
                 help="the reference's global_dtype: float32 (default, as our DTYPE) or "
                      'bfloat16 (as published)')
  p.add_argument('--out', help='also write the JSON results to this file')
  p.add_argument('--profile_dir', help='after timing, trace steps of each side here and print '
                                       'the XLA ops that took longest')
  p.add_argument('--profile_steps', type=int, default=3)
  p.add_argument('--top_ops', type=int, default=12, help='kinds of op and ops listed per side '
                                                         'with --profile_dir')
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    p.error('--steps must be >= 1 and --warmup >= 0')
  if not os.path.isfile(os.path.join(args.reference_dir, 'jaxtransformer', 'transformer.py')):
    p.error(f'--reference_dir={args.reference_dir}: no jaxtransformer/transformer.py there; '
            'pass a checkout of github.com/kvfrans/jaxtransformer')
  return args


def _benchmark_module():
  """tools/benchmark.py, loaded from its file (tools/ is not a package)."""
  name = 'reference_bench_benchmark'
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools',
                                                                     'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # registered first: its dataclasses look themselves up there
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return sys.modules[name]


# ------------------------------------------------------------------ the reference side ---------
def import_reference(reference_dir: str, dtype: str):
  """(transformer, modalities, train_state) modules of the reference, its global_dtype set."""
  import importlib
  import jax.numpy as jnp
  path = os.path.abspath(reference_dir)
  if path not in sys.path:
    sys.path.insert(0, path)
  tf = importlib.import_module('jaxtransformer.transformer')
  md = importlib.import_module('jaxtransformer.modalities')
  ts = importlib.import_module('jaxtransformer.utils.train_state')
  # Both modules read the name at call time; modalities holds its own imported copy.
  tf.global_dtype = md.global_dtype = getattr(jnp, dtype)
  return tf, md, ts


def reference_models(tf, md):
  """family -> a Flax module built from the reference's parts as its example builds it."""
  import jax.numpy as jnp
  from flax import linen as nn

  class DiT(nn.Module):                     # examples/train_diffusion.py: DiffusionModel
    patch: int
    num_classes: int

    @nn.compact
    def __call__(self, x, t, y):            # x [b, H, W, c], t [b], y [b]
      l = (x.shape[1] // self.patch) ** 2
      h = md.PatchEmbed(self.patch, HIDDEN)(x) + md.get_2d_sincos_pos_embed(None, HIDDEN, l)
      c = md.TimestepEmbed(HIDDEN)(t) + md.TokenEmbed(self.num_classes + 1, HIDDEN)(y)
      h = tf.TransformerBackbone(HIDDEN, DEPTH, HEADS, MLP_RATIO, use_conditioning=True,
                                 use_causal_masking=False)(h, c)
      # The example's final adaLN (see the module docstring), then the reference's PatchOutput.
      zeros = nn.initializers.zeros_init()
      shift, scale = jnp.split(nn.Dense(2 * HIDDEN, kernel_init=zeros, bias_init=zeros,
                                        dtype=tf.global_dtype)(nn.silu(c)), 2, axis=-1)
      h = nn.LayerNorm(use_bias=False, use_scale=False, dtype=tf.global_dtype)(h)
      return md.PatchOutput(self.patch, x.shape[-1])(tf.modulate(h, shift, scale))

    def weight_decay_mask(self, params):
      return {k: k != 'TokenEmbed_0' for k in params}

  class ViT(nn.Module):                     # examples/train_vit.py: ViTModel
    patch: int
    num_classes: int

    @nn.compact
    def __call__(self, x):                  # x [b, H, W, c]
      l = (x.shape[1] // self.patch) ** 2
      h = md.PatchEmbed(self.patch, HIDDEN)(x) + md.get_2d_sincos_pos_embed(None, HIDDEN, l)
      cls = md.TokenEmbed(1, HIDDEN)(jnp.zeros((x.shape[0], 1), jnp.int32))
      h = tf.TransformerBackbone(HIDDEN, DEPTH, HEADS, MLP_RATIO, use_conditioning=False,
                                 use_causal_masking=False)(jnp.concatenate([cls, h], axis=1))
      return md.ClassifierOutput(self.num_classes)(h[:, 0])

    def weight_decay_mask(self, params):
      return {k: True for k in params}

  class GPT(nn.Module):                     # examples/train_llm.py: LLMModel
    vocab: int

    @nn.compact
    def __call__(self, ids):                # ids [b, l]
      h = md.TokenEmbed(self.vocab, HIDDEN)(ids.astype(jnp.uint32))
      h = h + md.TokenEmbed(ids.shape[1], HIDDEN)(jnp.arange(ids.shape[1])[None])
      h = tf.TransformerBackbone(HIDDEN, DEPTH, HEADS, MLP_RATIO, use_conditioning=False,
                                 use_causal_masking=True)(h)
      return md.ClassifierOutput(self.vocab)(h)

    def weight_decay_mask(self, params):
      return {k: k not in ('TokenEmbed_0', 'TokenEmbed_1') for k in params}

  return {'dit': DiT(SHAPES['dit']['patch'], NUM_CLASSES),
          'vit': ViT(SHAPES['vit']['patch'], NUM_CLASSES), 'gpt': GPT(VOCAB)}


def _reference_loss(family: str):
  """(state, params, batch, key) -> (loss, info): each example's objective."""
  import jax
  import jax.numpy as jnp

  def dit(state, params, batch, key):       # rectified flow, velocity target
    x1, labels = batch['image'], batch['label']
    t_key, eps_key, labels_key, _ = jax.random.split(key, 4)   # the 4th: the example's VAE draw
    drop = jax.random.bernoulli(labels_key, CLASS_DROPOUT, labels.shape)
    labels = jnp.where(drop, NUM_CLASSES, labels)
    t = jax.random.randint(t_key, labels.shape, 0, DENOISE_STEPS).astype(jnp.float32)
    t = t / DENOISE_STEPS
    x0 = jax.random.normal(eps_key, x1.shape)
    tt = t[:, None, None, None]
    x_t = (1 - (1 - 1e-5) * tt) * x0 + tt * x1
    v_t = x1 - (1 - 1e-5) * x0
    v = state.call_model(x_t, t, labels, params=params)
    loss = jnp.mean((v - v_t) ** 2)
    return loss, {'loss': loss, 'v_magnitude_prime': jnp.sqrt(jnp.mean(v ** 2)),
                  'v_magnitude_true': jnp.sqrt(jnp.mean(v_t ** 2))}

  def vit(state, params, batch, key):       # cross-entropy against a one-hot target
    del key
    logits = state.call_model(batch['image'], params=params)
    logp = jax.nn.log_softmax(logits)
    loss = jnp.mean(jnp.sum(-logp * jax.nn.one_hot(batch['label'], NUM_CLASSES), axis=-1))
    return loss, {'loss': loss,
                  'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}

  def gpt(state, params, batch, key):       # next-token cross-entropy, one-hot target
    del key
    ids, targets = batch['tokens'][:, :-1], batch['tokens'][:, 1:]
    logits = state.call_model(ids, params=params)
    logp = jax.nn.log_softmax(logits)
    loss = jnp.mean(jnp.sum(-logp * jax.nn.one_hot(targets, VOCAB), axis=-1))
    return loss, {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == targets),
                  'perplexity': jnp.exp(loss)}

  return {'dit': dit, 'vit': vit, 'gpt': gpt}[family]


def _reference_batch(family: str, key):
  import jax
  import jax.numpy as jnp
  s = SHAPES[family]
  k1, k2 = jax.random.split(key)
  if family == 'gpt':   # the example feeds text[:, :-1]: seq_len + 1 tokens per row
    return {'tokens': jax.random.randint(k1, (s['batch'], s['seq_len'] + 1), 0, VOCAB,
                                         jnp.int32)}
  shape = (s['batch'], s['image'], s['image'], s['channels'])
  return {'image': jax.random.normal(k1, shape, jnp.float32),
          'label': jax.random.randint(k2, (s['batch'],), 0, NUM_CLASSES, jnp.int32)}


def build_reference(family: str, modules, seed: int = 0) -> dict:
  """The reference's model, optimizer and train step for `family`: a compiled step (state
  donated), its state and a batch on the device."""
  import jax
  import jax.numpy as jnp
  import optax
  tf, md, ts_lib = modules
  model = reference_models(tf, md)[family]
  s = SHAPES[family]
  if family == 'gpt':
    inputs = (jnp.zeros((1, s['seq_len']), jnp.int32),)
  else:
    image = jnp.zeros((1, s['image'], s['image'], s['channels']))
    inputs = ((image, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)) if family == 'dit'
              else (image,))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)['params']
  lr_fn = optax.linear_schedule(0.0, LR, WARMUP)
  tx = optax.adamw(lr_fn, b1=B1, b2=B2, weight_decay=WEIGHT_DECAY,
                   mask=model.weight_decay_mask(abstract))
  use_ema = False   # the examples' optimizer_config: use_ema 0
  state = jax.jit(lambda rng: ts_lib.TrainState.create(
      rng=rng, model_def=model, model_input=inputs, tx=tx, use_ema=use_ema))(
          jax.random.PRNGKey(seed))
  loss_fn = _reference_loss(family)

  def step(state, batch):                   # the examples' update()
    rng, key = jax.random.split(state.rng)
    grads, info = jax.grad(lambda p: loss_fn(state, p, batch, key), has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    info.update(grad_norm=optax.global_norm(grads), update_norm=optax.global_norm(updates),
                param_norm=optax.global_norm(params), lr=lr_fn(state.step))
    state = state.replace(rng=rng, step=state.step + 1, params=params, opt_state=opt_state)
    return state, info

  batch = jax.jit(lambda k: _reference_batch(family, k))(jax.random.PRNGKey(seed + 12345))
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {'run': lambda st: compiled(st, batch), 'state': state, 'params': int(n_params),
          'compile_s': time.perf_counter() - t0,
          'includes': (f'AdamW (lr {LR} after {WARMUP}-step warmup, wd {WEIGHT_DECAY}), no '
                       f'clipping, no EMA; grad/update/param norms'),
          'dtype': jnp.dtype(tf.global_dtype).name}


# ------------------------------------------------------------------ our side -------------------
def build_ours(family: str, extra=(), seed: int = 0, log=print) -> dict:
  """Our experiment at the reference's shape: mesh, sharded init and the donated, compiled
  train step, by tools/benchmark.py's own `prepare`."""
  bench = _benchmark_module()
  exp_name, overrides = ours_overrides(family, extra)
  p = bench.prepare(exp_name, overrides, seed=seed, log=log)
  if p.frozen is not None:
    raise ValueError('reference_bench compares pixel-space DiTs; unset USE_VAE')
  exp = p.exp

  def run(state):
    return p.compiled(state, p.batch, p.frozen)

  extras = [f'grad clip {exp.GRAD_CLIP}' if exp.GRAD_CLIP else 'no clipping',
            f'EMA {exp.EMA_DECAY}' if exp.EMA_DECAY else 'no EMA']
  return {'run': run, 'state': p.state, 'params': int(p.param_count),
          'compile_s': p.compile_time_s, 'experiment': exp_name, 'overrides': overrides,
          'flops_per_example': p.settings.flops_per_example,
          'batch': p.settings.global_batch,
          'includes': (f'AdamW (lr {exp.LR} after {exp.WARMUP}-step warmup, wd '
                       f'{exp.WEIGHT_DECAY}), {", ".join(extras)}; grad/param norms, '
                       'finite-step guard'),
          'dtype': exp.DTYPE,
          'knobs': {k: getattr(exp, k) for k in REPORTED_KNOBS if hasattr(exp, k)}}


# ------------------------------------------------------------------ timing ---------------------
def alternate(sides: dict, steps: int, warmup: int, log=print) -> dict:
  """Run each side's step `warmup` times, then `steps` rounds of one step per side in turn,
  blocking after each; returns {side: [seconds per step]}. Each side's state is donated and
  replaced in `sides[name]['state']`."""
  import jax
  for name, side in sides.items():
    for _ in range(warmup):
      side['state'], _ = side['run'](side['state'])
    jax.block_until_ready(side['state'])
  times = {name: [] for name in sides}
  for i in range(steps):
    for name, side in sides.items():
      t0 = time.perf_counter()
      side['state'], metrics = side['run'](side['state'])
      jax.block_until_ready((side['state'], metrics))
      times[name].append(time.perf_counter() - t0)
    log(f'round {i + 1}/{steps}: ' + ', '.join(f'{n} {1e3 * t[-1]:.1f} ms'
                                               for n, t in times.items()))
  return times


_RUNTIME_EVENTS = ('ThunkExecutor', 'PjitFunction', 'CommonPjRt', 'SlinkyThreadPool')


def op_profile(side: dict, steps: int, trace_dir: str) -> tuple[dict[str, float], float]:
  """({XLA op name: ms per step}, traced ms per step) over `steps` traced steps of one side.
  Needs XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true before jax starts (main sets it); the
  runtime's own events (thunk executor, dispatch) are left out of the ops."""
  import jax
  opts = jax.profiler.ProfileOptions()
  opts.python_tracer_level = 0
  os.makedirs(trace_dir, exist_ok=True)
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=opts)
  t0 = time.perf_counter()
  try:
    for _ in range(steps):
      side['state'], metrics = side['run'](side['state'])
      jax.block_until_ready((side['state'], metrics))
  finally:
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
  totals = collections.Counter()
  for path in glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True):
    with gzip.open(path, 'rt') as f:
      events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    for e in events:
      name = e.get('name', '?')
      if e.get('ph') == 'X' and 'dur' in e and not name.startswith(_RUNTIME_EVENTS):
        totals[name] += e['dur'] / 1e3 / steps
  return dict(totals), 1e3 * wall


def share_of_peak(flops_per_example: int, batch: int, result: dict, peak: float | None) -> dict:
  """Each side's share of `peak` (TFLOP/s, tools/benchmark.py's peak_fields), and the ceiling
  that puts on the ratio.

  Both sides run the same matmuls (the same backbone, heads and batch; our GPT's head has 47
  padded vocabulary rows more, under 0.1%), so one analytic count, ours (trainer/flops.py),
  times both. `ceiling` = peak / the reference's achieved TFLOP/s: the ratio a step doing the same
  arithmetic would reach at the peak. Where it is near 1 the reference is already at the peak and
  no implementation of the same model can be much faster there. {} without a peak."""
  from trainer import flops
  if not peak:
    return {}
  out = {}
  for name in ('reference', 'ours'):
    achieved = flops.train_tflops_per_device(flops_per_example, batch / result[name]['step_s'], 1)
    out[f'{name}_tflops'] = achieved
    out[f'{name}_share'] = achieved / peak
  out['ceiling'] = peak / out['reference_tflops']
  return out


# ------------------------------------------------------------------ output ---------------------
def markdown_table(results: list[dict]) -> str:
  lines = ['| family | reference ms | ours ms | ratio (ref / ours) | paired ratio | '
           'share of peak (ref / ours) | ceiling | '
           'reference params | our params | compile s (ref / ours) |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in results:
    if 'error' in r:
      lines.append(f"| {r['family']} | FAILED: {r['error'].splitlines()[0][:120]} "
                   '| | | | | | | | |')
      continue
    ref, ours = r['reference'], r['ours']
    paired = r.get('ratio_paired')
    share = (f"{r['reference_share']:.2f} / {r['ours_share']:.2f}" if 'ceiling' in r else '-')
    ceiling = f"{r['ceiling']:.2f}x" if 'ceiling' in r else '-'
    lines.append(f"| {r['family']} | {1e3 * ref['step_s']:.1f} | {1e3 * ours['step_s']:.1f} | "
                 f"{r['ratio']:.2f}x | {'-' if paired is None else f'{paired:.2f}x'} | "
                 f"{share} | {ceiling} | {ref['params']:,} | {ours['params']:,} | "
                 f"{ref['compile_s']:.1f} / {ours['compile_s']:.1f} |")
  return '\n'.join(lines)


def describe(results: list[dict]) -> str:
  out = []
  for r in results:
    if 'error' in r:
      continue
    ref, ours = r['reference'], r['ours']
    out.append(f"- {r['family']}: reference ({ref['dtype']}): {ref['includes']}. Ours "
               f"({ours['experiment']}, {ours['dtype']}, {ours['knobs']}): {ours['includes']}.")
  return '\n'.join(out)


def run_family(family: str, args, modules, log) -> dict:
  import jax
  if jax.device_count() > 1:
    raise RuntimeError(f'{jax.device_count()} devices: our experiment would shard over all of '
                       'them and the reference runs on one; make one visible (e.g. '
                       'CUDA_VISIBLE_DEVICES=0)')
  log(f'{family}: building the reference and ours')
  sides = {'reference': build_reference(family, modules, args.seed),
           'ours': build_ours(family, args.set, args.seed, log)}
  log(f"{family}: params reference {sides['reference']['params']:,}, ours "
      f"{sides['ours']['params']:,}; {args.warmup} warm-up + {args.steps} alternating rounds")
  bench, dtype = _benchmark_module(), sides['ours']['dtype']
  before = bench.matmul_rates([dtype])
  times = alternate(sides, args.steps, args.warmup, log)
  peak = bench.peak_fields(dtype, before, bench.matmul_rates([dtype]))
  result = {'family': family, 'steps': args.steps, 'warmup': args.warmup,
            'shape': SHAPES[family], 'backbone': {'hidden': HIDDEN, 'depth': DEPTH,
                                                  'heads': HEADS, 'mlp_ratio': MLP_RATIO},
            'device': jax.devices()[0].device_kind}
  for name, side in sides.items():
    result[name] = {k: v for k, v in side.items() if k not in ('run', 'state')}
    result[name].update(step_s=statistics.median(times[name]), step_times_s=times[name])
  result['ratio'] = result['reference']['step_s'] / result['ours']['step_s']
  result.update(peak)
  result.update(share_of_peak(result['ours']['flops_per_example'], result['ours']['batch'],
                              result, peak['peak_tflops_per_device']))
  # each round's two steps ran back to back: their ratio cancels load that drifts over the run
  result['ratio_paired'] = statistics.median(
      r / o for r, o in zip(times['reference'], times['ours']))
  if args.profile_dir:
    for name, side in sides.items():
      ops, wall = op_profile(side, args.profile_steps,
                             os.path.join(args.profile_dir, f'{family}_{name}'))
      kinds = collections.Counter()   # copy_bitcast_fusion.37 -> copy_bitcast_fusion
      for op, ms in ops.items():
        kinds[re.sub(r'\.\d+$', '', op)] += ms
      top = sorted(ops.items(), key=lambda kv: -kv[1])[:args.top_ops]
      result[name].update(top_ops_ms=dict(top), op_kinds_ms=dict(kinds.most_common()),
                          op_ms_total=sum(ops.values()), traced_step_ms=wall)
      log(f'{family} {name}: {wall:.0f} ms per traced step, {sum(ops.values()):.0f} ms in '
          f'ops (summed over threads); by kind of op:\n' +
          '\n'.join(f'  {ms:8.1f}  {kind}' for kind, ms in kinds.most_common(args.top_ops)) +
          '\n  the longest ops:\n' + '\n'.join(f'  {ms:8.1f}  {op}' for op, ms in top))
  return result


def main(argv=None) -> int:
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if args.profile_dir:   # CPU op events in the trace: must be set before jax starts
    flags = os.environ.get('XLA_FLAGS', '')
    if 'xla_cpu_enable_xprof_traceme' not in flags:
      os.environ['XLA_FLAGS'] = (flags + ' --xla_cpu_enable_xprof_traceme=true').strip()
  log = lambda msg: print(f'[reference_bench] {msg}', file=sys.stderr, flush=True)
  from trainer import allocator
  log(allocator.describe())
  modules = import_reference(args.reference_dir, args.reference_dtype)
  families = FAMILIES if args.family == 'all' else (args.family,)
  results, status = [], 0
  for family in families:
    try:
      results.append(run_family(family, args, modules, log))
    except Exception as e:  # a failed family is a row too; the others still run
      traceback.print_exc()
      results.append({'family': family, 'error': f'{type(e).__name__}: {e}'})
      status = 1
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump({'args': {k: v for k, v in vars(args).items() if k != 'reference_dir'},
                 'results': results}, f, indent=2)
      f.write('\n')
  print(markdown_table(results))
  print()
  print(describe(results))
  return status


if __name__ == '__main__':
  from trainer import allocator
  allocator.reexec()   # TCMalloc, as launch.py runs (trainer/allocator.py); both sides alike here
  sys.exit(main())
