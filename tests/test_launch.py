"""launch.py end to end, in subprocesses: training, events, checkpoints, resume, FSDP, errors."""
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.numerics import assert_close_f32
from trainer.summaries import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices, extra_path=None, **extra):
  """The environment of a launch.py subprocess: CPU with `devices` fake devices, the repository
  importable, and the session's shared compilation cache (conftest.py)."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, extra_path, os.environ.get('PYTHONPATH')) if p),
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
      JAX_COMPILATION_CACHE_DIR=os.environ['ZOO_TEST_XLA_CACHE'],
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0', **extra)


def launch(*args, devices=1, cwd=ROOT, extra_path=None, env=None):
  env = subprocess_env(devices, extra_path, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], env=env,
                        cwd=cwd, capture_output=True, text=True, timeout=600)


def ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def trained_once(tmp_path_factory, name, *args, devices=1):
  """(workdir, stderr) of `launch.py --workdir=<dir> *args`, run once per test session across
  all xdist workers (their temp dirs share a parent; a file lock serialises the first run), for
  the tiny checkpoints several tests only read."""
  import filelock
  # under xdist each worker's basetemp is a child of the session's; without it the parent is
  # shared by every session, so a run made by older code would be read back
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  wd, log = root / f'shared-{name}', root / f'shared-{name}.stderr'
  with filelock.FileLock(str(root / f'shared-{name}.lock')):
    if not log.exists():
      result = ok(launch(f'--workdir={wd}', *args, devices=devices))
      log.write_text(result.stderr)
  return str(wd), log.read_text()


FAMILY_RUN = ['--set', 'NUM_STEPS=6', '--set', 'LOG_EVERY=1', '--set', 'CKPT_EVERY=3',
              '--set', 'GLOBAL_BATCH=8', '--set', 'EVAL_BATCHES=1']


def family_run(tmp_path_factory, exp):
  """A 6-step run of `exp` on one process with 4 devices, checkpoints at steps 3 and 6: the
  end-to-end check of each family here, and the reference of the multi-host tests."""
  return trained_once(tmp_path_factory, f'{exp}-4dev', f'--exp={exp}', *FAMILY_RUN, devices=4)


def final_params(workdir, step):
  import orbax.checkpoint as ocp
  tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step),
                                                         'state'))
  import jax
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree['params'])}


@pytest.mark.parametrize('exp', ['DiT_T_Synthetic', 'ViT_T_Synthetic', 'GPT_T_Synthetic'])
def test_family_trains_end_to_end(exp, tmp_path_factory):
  wd, stderr = family_run(tmp_path_factory, exp)
  scalars = read_scalars(os.path.join(wd, 'tensorboard'))
  assert [s for s, _ in scalars['learning/loss']] == [1, 2, 3, 4, 5, 6]
  # the first step (compilation) is not timed
  assert [s for s, _ in scalars['perf/tflops_per_device']] == [2, 3, 4, 5, 6]
  assert all(v > 0 for _, v in scalars['perf/tflops_per_device'])
  # the share of each timed interval the loop waited for its batch (prefetched by a thread)
  assert [s for s, _ in scalars['perf/input_wait_fraction']] == [2, 3, 4, 5, 6]
  assert all(0 <= v < 1 for _, v in scalars['perf/input_wait_fraction'])
  assert 'the loop waited for input' in stderr
  assert np.isfinite([v for _, v in scalars['learning/loss']]).all()
  assert [v for _, v in scalars['learning/skipped_steps']] == [0] * 6
  assert 'eval/loss' in scalars
  assert 'process 0 of 1 reads rows 0-7 of each global batch of 8' in stderr
  assert "'fsdp': 4" in stderr and 'over 4 devices' in stderr
  if exp.startswith('GPT'):
    # every array with a model dim lands on fsdp: the 8 stacked block arrays (SCAN_LAYERS: one
    # array per kind over all layers, 'layers' unsharded), both tables; the largest (a tie with
    # the token table, the first in key order wins) is the stacked MLP input kernel
    line = [l for l in stderr.splitlines() if 'sharded over fsdp' in l][0]
    assert "largest ['backbone']['blocks']['mlp']['wi']['kernel']:" in line, line
    assert "(None, 'fsdp', None)" in line
    assert int(line.split('] ')[1].split(' of ')[0]) == 10
    assert 'perf/tokens_per_s' in scalars
    # held-out prompts and their continuations, as text beside the eval metrics
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(os.path.join(wd, 'tensorboard'), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    texts = acc.Tensors('eval/continuations/text_summary')
    assert [t.step for t in texts] == [6]
    assert texts[0].tensor_proto.string_val[0].decode().count('→') == 4
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['3', '6']
  for name in ('config.txt', 'config.json'):
    assert os.path.getsize(os.path.join(wd, name)) > 100
  samples = {'DiT': ['step_6.png'], 'GPT': ['step_6.txt'], 'ViT': None}[exp[:3]]
  if samples:
    assert os.listdir(os.path.join(wd, 'samples')) == samples


def test_dry_run_prints_params_and_shardings():
  out = ok(launch('--exp=DiT_XL_ImageNet256', '--dry_run', devices=8))
  lines = out.stdout.splitlines()
  params = int([l for l in lines if l.startswith('params: ')][0].split()[1])
  assert abs(params / 675e6 - 1) < 0.01
  # at-scale experiments unroll their blocks (experiments/base.AtScale): 28 of them, each MLP
  # kernel's model dim on fsdp
  wi = [l for l in lines if "['mlp']['wi']['kernel']" in l]
  assert len(wi) == 28 and all("['backbone']['block" in l and l.endswith("P('fsdp', None)")
                               for l in wi), wi[:3]
  scanned = ok(launch('--exp=DiT_XL_ImageNet256', '--dry_run', '--set', 'SCAN_LAYERS=True',
                      devices=8)).stdout.splitlines()
  assert any("['blocks']['mlp']['wi']['kernel']" in l and l.endswith("P(None, 'fsdp', None)")
             for l in scanned)


def test_cpu_devices_knob_splits_the_host_unless_the_environment_says(monkeypatch):
  # ViT_T_FashionMNIST asks for 2 CPU devices; with no device count in the environment the
  # launch makes them, and an explicit XLA_FLAGS count (tests, multi-host) wins over the knob
  bare = {k: v for k, v in subprocess_env(1).items()
          if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  run = lambda env, *a: ok(subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--exp=ViT_T_FashionMNIST', '--dry_run',
       *a], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600))
  out = run(bare)
  # its MESH keeps the 0.14M parameters whole on both devices (data parallel)
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 devices" in out.stdout
  assert 'CPU split into 2 device(s) (CPU_DEVICES)' in out.stderr
  out = run(bare, '--set', 'CPU_DEVICES=4')
  assert 'over 4 devices' in out.stdout
  out = run(dict(bare, XLA_FLAGS='--xla_force_host_platform_device_count=3'))
  assert 'over 3 devices' in out.stdout
  assert 'CPU_DEVICES=2 not applied' in out.stderr

  from trainer import host_devices
  with pytest.raises(ValueError, match='CPU_DEVICES=0 must be at least 1'):
    host_devices.configure(0)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  # this process set jax.config's count (conftest.py): a choice made before the knob, so it wins
  assert 'jax_num_cpu_devices=8); CPU_DEVICES=3 not applied' in host_devices.configure(3)
  # where nothing chose: the knob applies, and once the backend runs it cannot change
  script = textwrap.dedent("""
      import jax
      from trainer import host_devices
      print(host_devices.configure(2), len(jax.devices()))
      print(host_devices.configure(2))
      try:
        host_devices.configure(3)
      except RuntimeError as e:
        print(e)
  """)
  lines = ok(subprocess.run([sys.executable, '-c', script], env=bare, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)).stdout.splitlines()
  assert lines == ['CPU split into 2 device(s) (CPU_DEVICES) 2',
                   'CPU split into 2 device(s) (already so)',
                   'CPU_DEVICES=3, but JAX already started its CPU backend with 2 device(s); set '
                   'it before the first JAX computation'], lines


def test_list_and_print_config():
  listing = ok(launch('--exp=list')).stdout
  assert 'DiT_XL_ImageNet256' in listing and 'GPT_T_Bible' in listing
  names = [line.split()[0] for line in listing.splitlines()]
  assert 'DiT' not in names and 'Experiment' not in names   # families are not listed
  printed = ok(launch('--exp=GPT_T_Bible', '--print_config', '--set', 'DEPTH=3')).stdout
  assert 'model.depth: int = 3' in printed


def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(p.encode())
      with open(p, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  return trained_once(tmp_path_factory, 'vit-log-every-1', '--exp=ViT_T_Synthetic',
                      '--set', 'NUM_STEPS=2', '--set', 'LOG_EVERY=1')[0]


@pytest.mark.parametrize('args, message', [
    (['--exp=ViT_T_Synthetc'], 'Did you mean: ViT_T_Synthetic'),
    (['--exp=ViT_T_Synthetic', '--set', 'NUM_STEP=3'], "no knob 'NUM_STEP'"),
    (['--exp=ViT_T_Synthetic', '--set', 'HIDDEN=30'], 'HIDDEN=30 is not divisible by HEADS=4'),
    (['--exp=ViT_T_Synthetic', '--set', 'IMAGE_SIZE=15'], 'IMAGE_SIZE=15 is not divisible by'),
    (['--exp=ViT_T_FashionMNIST', '--set', "FASHION_MNIST_DIR='/nonexistent/fmnist'"],
     'apt-get install dataset-fashion-mnist'),
    (['--exp=ViT_S_ImageNet', '--set', "DATA_DIR='/nonexistent/tfds'"],
     "dataset 'imagenet2012' is not prepared: no /nonexistent/tfds/imagenet2012/"),
    (['--exp=ViT_S_ImageNet', '--set', "IMAGE_FOLDER='/nonexistent/images'"],
     'IMAGE_FOLDER /nonexistent/images is not a directory'),
    (['--exp=ViT_T_Synthetic', '--set', 'NUM_STEPS=2.5'], 'NUM_STEPS takes an integer'),
    (['--exp=GPT_T_Synthetic', '--set', 'LOSS_CHUNK=64.0'], 'LOSS_CHUNK=64.0 takes an integer, or'),
    (['--exp=ViT_T_Synthetic', '--set', 'EVAL_EVERY=0'], 'EVAL_EVERY=0 must be at least 1'),
    (['--exp=ViT_T_Synthetic', '--set', 'ATTENTION_IMPL=flash'],
     "ATTENTION_IMPL='flash': use one of 'einsum', 'xla', 'cudnn', 'splash', 'auto'"),
    (['--exp=ViT_T_Synthetic', '--set', 'DTYPE=float16'], "DTYPE='float16': use one of"),
    (['--exp=ViT_T_Synthetic', '--set', "MESH={'fsdp': 3}"], 'needs 3 devices but 1 are present'),
    (['--exp=ViT_T_Synthetic', '--process_id=1'], '--coordinator, --num_processes missing'),
    # the workdir's checkpoint is of another experiment, or of other shapes: refused, untouched
    (['--exp=GPT_T_Synthetic'], 'holds checkpoints of ViT_T_Synthetic (step 2), not '
     'GPT_T_Synthetic: pass --exp=ViT_T_Synthetic'),
    (['--exp=ViT_T_Synthetic', '--set', 'HIDDEN=96'], 'knobs that differ: HIDDEN=64 there, 96 '
     'here'),
    (['--exp=ViT_T_Synthetic', '--set', 'SCAN_LAYERS=False'], 'its blocks are stacked (saved '
     'with SCAN_LAYERS=True) and this run unrolls them: pass --set SCAN_LAYERS=True'),
    (['--exp=ViT_T_Synthetic', '--set', 'REMAT=some'], "REMAT='some': use one of 'none', 'full'"),
])
def test_bad_input_fails_in_one_line_and_keeps_checkpoints(trained_workdir, args, message):
  before = _tree_digest(os.path.join(trained_workdir, 'checkpoints'))
  result = launch(*args, f'--workdir={trained_workdir}')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('launch.py: error:')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert _tree_digest(os.path.join(trained_workdir, 'checkpoints')) == before
  assert open(os.path.join(trained_workdir, 'config.txt')).read().count('# ---- ') == 1


def test_user_module_experiment_trains(tmp_path):
  (tmp_path / 'my_exps.py').write_text(
      'from experiments.gpt import GPT_T_Synthetic\n\n\n'
      'class TinierGPT(GPT_T_Synthetic):\n'
      '  """A user experiment: one block."""\n'
      '  DEPTH = 1\n'
      '  NUM_STEPS = 4\n')
  out = ok(launch('--exp=my_exps.TinierGPT', f'--workdir={tmp_path / "wd"}',
                  extra_path=str(tmp_path)))
  assert 'final eval: loss=' in out.stdout
  assert 'model.depth: int = 1' in open(tmp_path / 'wd' / 'config.txt').read()
