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
flags.DEFINE_string('coordinator', None, 'host:port of process 0 for multi-host runs; with '
                    '--num_processes and --process_id. Omit all three on one host, or with '
                    '--multihost where the cluster says them (SLURM, TPU pods, Open MPI).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 (multi-host).')
flags.DEFINE_bool('multihost', False, 'Join a multi-host run whose processes are found by '
                  'jax.distributed.initialize() from the cluster environment (SLURM, TPU pods, '
                  'Open MPI); also switched on by ZOO_MULTIHOST=1.')
FLAGS = flags.FLAGS

MULTIHOST_ENV = 'ZOO_MULTIHOST'


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


def sample(cfg, knobs: dict) -> None:
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
    result = sampling.sample_text(run, FLAGS.workdir, FLAGS.num_samples, FLAGS.out,
                                   knobs=knobs)
    print(f'{len(result["records"])} continuations of step {result["step"]} -> {FLAGS.out}')
    return
  result = sampling.sample_images(run, FLAGS.workdir, FLAGS.num_samples, FLAGS.out,
                                   knobs=knobs)
  print(f'{len(result["images"])} samples of step {result["step"]} -> {FLAGS.out} '
        f'(grid: {result["grid"]})')


def evaluate(cfg, knobs: dict) -> dict:
  """--mode=eval: the metrics of the workdir's latest checkpoint, printed as one JSON line and
  written to WORKDIR/eval/step_N.json (process 0). The training data is built but never read."""
  import jax
  from flax import linen as nn
  from layers import sharding
  from trainer import state as state_lib
  from trainer.evaluation import Evaluator
  from trainer.restore import latest_params
  run = build(cfg)
  params, step, _ = latest_params(run, FLAGS.workdir, knobs=knobs)
  if run.judge is not None:
    run.judge.load()   # a judging classifier is restored outside the run's mesh, as above
  mesh = sharding.make_mesh(run.loop.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    frozen, _ = state_lib.place_frozen(run.codec, mesh)
    metrics = Evaluator(run, mesh, frozen)(params, step)
  record = {'experiment': run.loop.experiment, 'step': step,
            'params': 'ema' if run.loop.ema_decay else 'trained', **metrics}
  if jax.process_index() == 0:
    from trainer import workdir as workdir_lib
    workdir_lib.write_text(workdir_lib.join(workdir_lib.resolve(FLAGS.workdir), 'eval',
                                            f'step_{step}.json'), json.dumps(record, indent=2))
    print(json.dumps(record))
  return record


def cluster_processes() -> tuple[str, int] | None:
  """(what, process count) of a multi-process cluster job visible in the environment, or None:
  the cases where N copies of this command are N processes of one job."""
  env = os.environ
  for what, var in (('SLURM', 'SLURM_NTASKS'), ('Open MPI', 'OMPI_COMM_WORLD_SIZE'),
                    ('PMI/MPICH', 'PMI_SIZE')):
    if env.get(var, '').isdigit() and int(env[var]) > 1:
      return what, int(env[var])
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1:
    return 'TPU pod', len(hosts)
  return None


def init_distributed() -> None:
  """jax.distributed.initialize from the three flags, from the cluster's environment with
  --multihost, or not at all; before any other use of JAX."""
  import jax
  # CPU hosts need a collectives backend to run one computation across processes; GPU and TPU
  # ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  given = {'--coordinator': FLAGS.coordinator, '--num_processes': FLAGS.num_processes,
           '--process_id': FLAGS.process_id}
  wanted = FLAGS.multihost or os.environ.get(MULTIHOST_ENV, '').lower() in ('1', 'true', 'yes')
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise UsageError(f'multi-host flags go together: {", ".join(missing)} missing (or drop '
                       'all three and pass --multihost where the cluster provides them)')
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise UsageError(f'--process_id={FLAGS.process_id} must be in [0, '
                       f'--num_processes={FLAGS.num_processes})')
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  elif wanted:
    try:
      jax.distributed.initialize()
    except ValueError as e:   # JAX found no cluster environment to read
      raise UsageError(f'--multihost: no cluster environment found ({e}); pass --coordinator, '
                       '--num_processes and --process_id') from None
  else:
    cluster = cluster_processes()
    if cluster:
      logging.warning(
          '%s reports %d processes but this one runs alone: each copy of this command trains '
          'its own model into the same workdir. Pass --multihost (or set %s=1) so that they '
          'form one run, or launch a single process.', cluster[0], cluster[1], MULTIHOST_ENV)
    return
  logging.info('process %d of %d, %d local of %d devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  del argv
  if FLAGS.exp is None:
    raise UsageError('--exp is required (--exp=list shows the experiments)')
  if FLAGS.exp == 'list':
    print(list_experiments())
    return
  from trainer import allocator
  try:
    logging.info(allocator.reexec())   # once, before anything is loaded: TCMalloc, if installed
  except ValueError as e:
    raise UsageError(str(e)) from None
  from experiments import base
  exp, cfg = base.build_config(FLAGS.exp, FLAGS.set)
  if FLAGS.print_config:
    print(config_text(cfg))
    return
  from trainer import host_devices
  logging.info(host_devices.configure(exp.CPU_DEVICES))
  init_distributed()
  if FLAGS.dry_run:
    print(dry_run(cfg))
    return
  if not FLAGS.workdir:
    raise UsageError('--workdir is required for training (checkpoints and events go there)')
  if FLAGS.mode == 'sample':
    sample(cfg, exp.knob_values())
    return
  if FLAGS.mode == 'eval':
    evaluate(cfg, exp.knob_values())
    return

  import jax
  from trainer import loop
  from trainer import workdir as workdir_lib
  run = build(cfg)              # data and VAE load here: a missing one fails before any write
  workdir = workdir_lib.resolve(FLAGS.workdir)
  if jax.process_index() == 0:
    workdir_lib.check_writable(workdir)
  if jax.process_count() > 1 and not workdir_lib.is_url(workdir):
    logging.warning('workdir %s is a local path: every host must see the same directory '
                    '(NFS or another shared file system), or pass a bucket URL', workdir)
  text = config_text(cfg)

  def record(step):   # called once the workdir's checkpoint is known to fit this run
    if jax.process_index() == 0:
      workdir_lib.record_invocation(workdir, text, sys.argv, step)
      js = config_json(cfg)
      if js is not None:
        workdir_lib.write_text(workdir_lib.join(workdir, 'config.json'), js)
      workdir_lib.write_text(workdir_lib.join(workdir, 'knobs.json'), json.dumps(
          {'exp': FLAGS.exp, 'set': FLAGS.set}, indent=2))

  metrics = loop.train(run, workdir, text, knobs=exp.knob_values(), on_start=record)
  if metrics:
    print('final eval: ' + ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


def run_main(argv):
  """app.run's entry, turning the errors a user can fix into one line and a non-zero exit.

  Exit status: 0 done, or stopped by SIGTERM after saving (a preempted job that a scheduler
  requeues); 130 stopped by SIGINT (Ctrl-C) after saving; 2 a bad command line; 1 any other
  error a user can fix (the message says how). Internal errors keep their traceback."""
  import signal
  from experiments.base import ConfigError
  from trainer.checkpoint import SaveError
  from trainer.loop import Stopped
  from trainer.state import TrainError
  from trainer.workdir import WorkdirError

  def last_line(text, status):
    # one write, flushed: Orbax's threads may still be logging, and must not split the line
    sys.stderr.write(f'launch.py: {text}\n')
    sys.stderr.flush()
    sys.exit(status)

  try:
    main(argv)
  except Stopped as e:
    last_line(e, 130 if e.signum == signal.SIGINT else 0)
  except UsageError as e:
    last_line(f'error: {e}', 2)
  except (ConfigError, TrainError, FileNotFoundError, ImportError, SaveError, WorkdirError) as e:
    last_line(f'error: {type(e).__name__}: {e}', 1)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  flags.mark_flag_as_required('exp')
  app.run(run_main)
