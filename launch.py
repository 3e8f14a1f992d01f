"""Train an experiment: `python launch.py --exp=DiT_T_FashionMNIST --workdir=workdirs/dit`.

    --exp=list                     every registered experiment with its first docstring line
    --set KNOB=VALUE               an experiment knob (NUM_STEPS, HIDDEN, ...), repeatable
    --set model.depth=2            a dotted path into the Fiddle config
    --print_config                 print the resolved config and exit
    --dry_run                      build the model abstractly at full size: parameter count and
                                   every parameter's shape and mesh sharding; no data, no training
    --mode=sample --num_samples=N --out=PATH
                                   draw N samples from the workdir's latest checkpoint (EMA
                                   params when kept): images into PATH (.npz) and a PNG grid
                                   beside it, or continuations of held-out prompts into PATH
                                   (.jsonl); writes nothing under the workdir
    --mode=eval                    the experiment's eval metrics (the whole eval split, or
                                   EVAL_BATCHES of it; FID where configured) of the workdir's
                                   latest checkpoint, as one JSON line on stdout and in
                                   WORKDIR/eval/step_N.json; the checkpoints are not touched

Rerunning the same command resumes from the workdir's latest checkpoint.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

flags.DEFINE_string('exp', None, 'Experiment class name, module.path.ClassName, or "list".')
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and the config go here.')
flags.DEFINE_multi_string('set', [], 'KNOB=VALUE or dotted.config.path=VALUE; applied in order.')
flags.DEFINE_bool('print_config', False, 'Print the resolved config and exit.')
flags.DEFINE_bool('dry_run', False, 'Parameter count and sharding table, then exit.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'train (resuming from the '
                  'workdir), or sample from / evaluate its latest checkpoint.')
flags.DEFINE_integer('num_samples', 64, '--mode=sample: how many samples.')
flags.DEFINE_string('out', None, '--mode=sample: the .npz (images; a PNG grid goes beside '
                    'it) or .jsonl (text) to write.')
flags.DEFINE_string('coordinator', None, 'host:port of process 0 for multi-host runs; '
                    'omit on one host (or where jax.distributed auto-detects the cluster).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process (multi-host).')
FLAGS = flags.FLAGS


class UsageError(Exception):
  """Printed as one line, exit status 2."""


def list_experiments() -> str:
  from experiments import base
  lines = []
  for name, cls in base.registered().items():
    doc = (cls.__doc__ or '').strip().splitlines()
    lines.append(f'{name:28s} {doc[0] if doc else ""}')
  return '\n'.join(lines)


def config_text(cfg) -> str:
  from fiddle import printing
  return printing.as_str_flattened(cfg)


def config_json(cfg) -> str | None:
  from fiddle.experimental import serialization
  try:
    return serialization.dump_json(cfg, indent=2)
  except Exception as e:  # a value Fiddle cannot serialise must not stop training
    logging.warning('config not serialisable to JSON (%s); config.txt still has it', e)
    return None


def dry_run(cfg) -> str:
  """Abstract init at full size: no memory, no data."""
  import fiddle as fdl
  import jax
  from layers import sharding
  from trainer.state import count_params
  model, task = fdl.build(cfg.model), fdl.build(cfg.task)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *task.init_inputs(1))['params']
  mesh = sharding.make_mesh(cfg.loop.mesh)
  shardings = sharding.param_shardings(boxed, mesh)
  rows = []
  flat = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: hasattr(x, 'names'))
  for (path, box), sh in zip(flat, jax.tree.leaves(shardings)):
    rows.append(f'{jax.tree_util.keystr(path):64s} {str(tuple(box.value.shape)):20s} '
                f'{str(tuple(box.names)):34s} {sh.spec}')
  header = (f'mesh {dict(mesh.shape)} over {mesh.size} devices\n'
            f'{"parameter":64s} {"shape":20s} {"logical axes":34s} mesh sharding')
  return '\n'.join([header, *rows, f'params: {count_params(boxed)}'])


def build(cfg):
  """fdl.build, with a constructor's error as one line: ValueError -> ConfigError, and the Fiddle
  context it appends to the message left out."""
  import fiddle as fdl
  from experiments import base
  try:
    return fdl.build(cfg)
  except (ValueError, FileNotFoundError) as e:
    e = getattr(e, 'proxy_base_exception', e)
    if isinstance(e, ValueError):   # a constructor rejected a value (NUM_CLASSES vs the data, ...)
      raise base.ConfigError(str(e)) from None
    raise e from None


def sample(cfg) -> None:
  """--mode=sample: the run's model, task, VAE and optimizer (for the checkpoint's layout), but
  no data sources, so a run on data absent here still samples."""
  import types
  from trainer import sampling
  if not FLAGS.out:
    raise UsageError('--mode=sample needs --out=PATH (.npz)')
  parts = {k: build(getattr(cfg, k)) for k in ('model', 'task', 'optimizer', 'loop')}
  run = types.SimpleNamespace(**parts, codec=build(cfg.codec) if cfg.codec else None)
  if hasattr(run.task, 'continue_prompts'):   # a language model: prompts come from held-out data
    run.eval_data = build(cfg.eval_data)
    result = sampling.sample_text(run, FLAGS.workdir, FLAGS.num_samples, FLAGS.out)
    print(f'{len(result["records"])} continuations of step {result["step"]} -> {FLAGS.out}')
    return
  result = sampling.sample_images(run, FLAGS.workdir, FLAGS.num_samples, FLAGS.out)
  print(f'{len(result["images"])} samples of step {result["step"]} -> {FLAGS.out} '
        f'(grid: {result["grid"]})')


def evaluate(cfg) -> dict:
  """--mode=eval: the metrics of the workdir's latest checkpoint, printed as one JSON line and
  written to WORKDIR/eval/step_N.json (process 0). The training data is built but never read."""
  import jax
  from flax import linen as nn
  from layers import sharding
  from trainer import state as state_lib
  from trainer.evaluation import Evaluator
  from trainer.restore import latest_params
  run = build(cfg)
  params, step, _ = latest_params(run, FLAGS.workdir)
  if run.judge is not None:
    run.judge.load()   # a judging classifier is restored outside the run's mesh, as above
  mesh = sharding.make_mesh(run.loop.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    frozen, _ = state_lib.place_frozen(run.codec, mesh)
    metrics = Evaluator(run, mesh, frozen)(params, step)
  record = {'experiment': run.loop.experiment, 'step': step,
            'params': 'ema' if run.loop.ema_decay else 'trained', **metrics}
  if jax.process_index() == 0:
    directory = os.path.join(FLAGS.workdir, 'eval')
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f'step_{step}.json'), 'w') as f:
      json.dump(record, f, indent=2)
    print(json.dumps(record))
  return record


def main(argv):
  del argv
  if FLAGS.exp is None:
    raise UsageError('--exp is required (--exp=list shows the experiments)')
  if FLAGS.exp == 'list':
    print(list_experiments())
    return
  from experiments import base
  _, cfg = base.build_config(FLAGS.exp, FLAGS.set)
  if FLAGS.print_config:
    print(config_text(cfg))
    return
  if FLAGS.coordinator or FLAGS.num_processes:
    import jax
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.dry_run:
    print(dry_run(cfg))
    return
  if not FLAGS.workdir:
    raise UsageError('--workdir is required for training (checkpoints and events go there)')
  if FLAGS.mode == 'sample':
    sample(cfg)
    return
  if FLAGS.mode == 'eval':
    evaluate(cfg)
    return

  import jax
  from trainer import loop
  run = build(cfg)              # data and VAE load here: a missing one fails before any write
  workdir = os.path.abspath(FLAGS.workdir)
  text = config_text(cfg)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.txt'), 'w') as f:
      f.write(text + '\n')
    js = config_json(cfg)
    if js is not None:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(js)
    with open(os.path.join(workdir, 'knobs.json'), 'w') as f:
      json.dump({'exp': FLAGS.exp, 'set': FLAGS.set}, f, indent=2)
  metrics = loop.train(run, workdir, text)
  if metrics:
    print('final eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


def run_main(argv):
  """app.run's entry, turning the errors a user can fix into one line and a non-zero exit."""
  from experiments.base import ConfigError
  from trainer.state import TrainError
  try:
    main(argv)
  except UsageError as e:
    print(f'launch.py: error: {e}', file=sys.stderr)
    sys.exit(2)
  except (ConfigError, TrainError, FileNotFoundError, ImportError) as e:
    print(f'launch.py: error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  flags.mark_flag_as_required('exp')
  app.run(run_main)
