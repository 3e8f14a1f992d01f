"""Evaluation: the whole split exactly once across processes, `launch.py --mode=eval`, and sample
metrics judged by a classifier trained here (eval/fd_*, eval/class_consistency) or by Inception."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from input.fashion_mnist import FashionMNIST
from models.vit import ViT
from tasks.classification import Classification
from tests.test_launch import launch, ok
from tests.test_sampling import snapshot
from trainer.summaries import read_scalars

TINY = ['--set', 'NUM_STEPS=2', '--set', 'CKPT_EVERY=2', '--set', 'EVAL_BATCHES=1']


def test_eval_split_is_read_exactly_once_over_two_processes():
  """Fashion-MNIST's 10,000 test images in global batches of 48 (208 full batches and 16 left
  over), split between 2 processes of 24 rows each: every image is read by exactly one process
  in exactly one batch, and the summed metrics equal a NumPy computation over the whole split."""
  model = ViT(image_size=28, channels=1, patch=7, hidden=32, depth=1, heads=2, num_classes=10)
  task = Classification(num_classes=10, image_size=28, channels=1)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  params = jax.tree.map(lambda b: b.value + 0.1 * jax.random.normal(jax.random.key(1),
                                                                     b.value.shape), params,
                        is_leaf=lambda x: hasattr(x, 'names'))   # a non-zero head
  step = jax.jit(lambda p, b: task.eval_step(model, p, b))
  seen, sums = [], None
  for process in range(2):
    source = FashionMNIST(48, split='test', train=False, process_index=process, process_count=2)
    assert source.num_eval_batches() == 209 and source.local_batch == 24
    for i in range(source.num_eval_batches()):
      batch = source.batch(i)
      seen.append(source.indices(i)[batch['mask'] > 0])
      out = jax.device_get(step(params, batch))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
  seen = np.concatenate(seen)
  assert len(seen) == 10_000 and np.array_equal(np.sort(seen), np.arange(10_000))
  metrics = task.finalize(sums)

  whole = FashionMNIST(10_000, split='test', train=False).batch(0)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, whole['image']), np.float64)
  nll = -scipy.special.log_softmax(logits, -1)[np.arange(10_000), whole['label']]
  assert metrics['loss'] == pytest.approx(nll.mean(), rel=1e-5)
  assert metrics['accuracy'] == pytest.approx((logits.argmax(-1) == whole['label']).mean(),
                                              abs=1e-12)
  assert 0.02 < metrics['accuracy'] < 0.98    # a real mix of right and wrong


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  """A tiny trained ViT_T_Synthetic: evaluated, and the judge of DiT_T_Synthetic's samples."""
  wd = str(tmp_path_factory.mktemp('vit') / 'wd')
  ok(launch('--exp=ViT_T_Synthetic', f'--workdir={wd}', *TINY))
  return wd


def test_eval_mode_prints_one_json_line_and_reads_only(classifier):
  before = snapshot(os.path.join(classifier, 'checkpoints'))
  args = ['--exp=ViT_T_Synthetic', f'--workdir={classifier}', '--mode=eval']
  out = ok(launch(*args, '--set', 'EVAL_BATCHES=0', devices=2))
  lines = out.stdout.strip().splitlines()
  record = json.loads(lines[-1])
  assert set(record) == {'experiment', 'step', 'params', 'loss', 'accuracy'}
  assert record['experiment'] == 'ViT_T_Synthetic' and record['step'] == 2
  assert record['params'] == 'trained'   # ViT_T_Synthetic keeps no EMA
  with open(os.path.join(classifier, 'eval', 'step_2.json')) as f:
    assert json.load(f) == record
  assert snapshot(os.path.join(classifier, 'checkpoints')) == before

  # the same numbers from the restored parameters, computed here over the whole eval split
  from experiments import base
  import fiddle as fdl
  from trainer.restore import latest_params
  _, cfg = base.build_config('ViT_T_Synthetic', ['EVAL_BATCHES=0'])
  run = fdl.build(cfg)
  params, step, _ = latest_params(run, classifier)
  logits, labels = [], []
  for i in range(run.eval_data.num_eval_batches()):
    batch = run.eval_data.batch(i)
    real = batch['mask'] > 0
    logits.append(np.asarray(run.model.apply({'params': params}, batch['image']))[real])
    labels.append(batch['label'][real])
  logits, labels = np.concatenate(logits).astype(np.float64), np.concatenate(labels)
  nll = -scipy.special.log_softmax(logits, -1)[np.arange(len(labels)), labels]
  assert len(labels) == run.eval_data.num_examples
  assert record['loss'] == pytest.approx(nll.mean(), rel=1e-5)
  assert record['accuracy'] == pytest.approx((logits.argmax(-1) == labels).mean(), abs=1e-9)


def test_eval_mode_errors_are_one_line(classifier, tmp_path):
  for args, message in [
      (['--exp=ViT_T_Synthetic', f'--workdir={tmp_path / "none"}'], 'no checkpoints in '),
      (['--exp=DiT_T_Synthetic', f'--workdir={classifier}'],
       'is of experiment ViT_T_Synthetic, not DiT_T_Synthetic; pass --exp=ViT_T_Synthetic')]:
    result = launch(*args, '--mode=eval')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith('launch.py: error: ')
    assert message in result.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'none')


def test_classifier_judges_the_samples_in_training_and_eval(classifier, tmp_path):
  """DiT_T_Synthetic judged by the trained ViT_T_Synthetic: eval/fd_syn and
  eval/class_consistency every step (FID_EVERY=1) and in --mode=eval, deterministic."""
  wd = str(tmp_path / 'dit')
  judge = ['--set', 'FID_NUM=6', '--set', 'FID_EVERY=1', '--set', 'FID_BATCH=4',
           '--set', 'JUDGE_EXP=ViT_T_Synthetic', '--set', f'JUDGE_DIR={classifier}',
           '--set', 'FD_NAME=fd_syn', '--set', 'DENOISE_STEPS=2']
  out = ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', *TINY, *judge,
                  '--set', 'SAMPLES_PER_CLASS=1', '--set', 'EVAL_EVERY=2'))
  scalars = read_scalars(os.path.join(wd, 'tensorboard'))
  assert [s for s, _ in scalars['eval/fd_syn']] == [1, 2]
  assert [s for s, _ in scalars['eval/class_consistency']] == [1, 2]
  assert [s for s, _ in scalars['eval/loss']] == [2]        # the split only at EVAL_EVERY
  assert all(np.isfinite(v) and v > 0 for _, v in scalars['eval/fd_syn'])
  assert all(v * 6 == round(v * 6) for _, v in scalars['eval/class_consistency'])
  assert 'fd_syn=' in out.stdout and 'class_consistency=' in out.stdout

  records = []
  for devices in (1, 2):
    result = ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', '--mode=eval', *judge,
                       devices=devices))
    records.append(json.loads(result.stdout.strip().splitlines()[-1]))
  assert records[0]['fd_syn'] == pytest.approx(records[1]['fd_syn'], rel=1e-4)
  assert records[0]['class_consistency'] == records[1]['class_consistency']
  # the EMA parameters, the same samples (fixed key) and features as the last training eval
  assert records[0]['fd_syn'] == pytest.approx(scalars['eval/fd_syn'][-1][1], rel=1e-4)


def test_missing_inception_weights_warn_once_and_training_goes_on(tmp_path):
  wd = str(tmp_path / 'dit')
  out = ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', *TINY, '--set', 'FID_NUM=4',
                  '--set', f'INCEPTION_PATH={tmp_path / "absent.npz"}',
                  '--set', 'SAMPLES_PER_CLASS=1', '--set', 'DENOISE_STEPS=2'))
  warnings = [line for line in out.stderr.splitlines() if 'eval/fid is off' in line]
  assert len(warnings) == 1 and 'absent.npz' in warnings[0], out.stderr[-2000:]
  assert 'convert_inception.py' in warnings[0]
  scalars = read_scalars(os.path.join(wd, 'tensorboard'))
  assert 'eval/loss' in scalars and 'eval/fid' not in scalars
  assert os.path.isdir(os.path.join(wd, 'checkpoints', '2'))
