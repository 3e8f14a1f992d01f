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
from tasks.common import pixels_to_float, prepare_images
from tests.test_launch import launch, ok, trained_once
from tests.test_sampling import snapshot
from trainer.summaries import read_scalars

TINY = ['--set', 'NUM_STEPS=2', '--set', 'CKPT_EVERY=2', '--set', 'EVAL_BATCHES=1']


def test_eval_split_is_read_exactly_once_over_two_processes():
  """Fashion-MNIST's 10,000 test images in global batches of 480 (20 full batches and 400 left
  over), split between 2 processes of 240 rows each: every image is read by exactly one process
  in exactly one batch, and the summed metrics equal a NumPy computation over the whole split."""
  model = ViT(image_size=28, channels=1, patch=7, hidden=32, depth=1, heads=2, num_classes=10)
  task = Classification(num_classes=10, image_size=28, channels=1)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  params = jax.tree.map(lambda b: b.value + 0.1 * jax.random.normal(jax.random.key(1),
                                                                     b.value.shape), params,
                        is_leaf=lambda x: hasattr(x, 'names'))   # a non-zero head
  step = jax.jit(lambda p, b: task.eval_step(model, p, prepare_images(b)))   # uint8 images
  seen, sums = [], None
  for process in range(2):
    source = FashionMNIST(480, split='test', train=False, process_index=process,
                          process_count=2)
    assert source.num_eval_batches() == 21 and source.local_batch == 240
    for i in range(source.num_eval_batches()):
      batch = source.batch(i)
      seen.append(source.indices(i)[batch['mask'] > 0])
      out = jax.device_get(step(params, batch))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
  seen = np.concatenate(seen)
  assert len(seen) == 10_000 and np.array_equal(np.sort(seen), np.arange(10_000))
  metrics = task.finalize(sums)

  whole = FashionMNIST(10_000, split='test', train=False).batch(0)
  logits = np.asarray(jax.jit(model.apply)({'params': params},
                                           whole['image'].astype(np.float32) / 127.5 - 1),
                      np.float64)
  nll = -scipy.special.log_softmax(logits, -1)[np.arange(10_000), whole['label']]
  assert metrics['loss'] == pytest.approx(nll.mean(), rel=1e-5)
  assert metrics['accuracy'] == pytest.approx((logits.argmax(-1) == whole['label']).mean(),
                                              abs=1e-12)
  assert 0.02 < metrics['accuracy'] < 0.98    # a real mix of right and wrong


@pytest.fixture(scope='session')
def classifier(tmp_path_factory):
  """A tiny trained ViT_T_Synthetic: evaluated, and the judge of DiT_T_Synthetic's samples."""
  return trained_once(tmp_path_factory, 'vit', '--exp=ViT_T_Synthetic', *TINY)[0]


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
       'not DiT_T_Synthetic: pass --exp=ViT_T_Synthetic to read that run'),
      # a model knob left at its default: the misfit names it, not Orbax's shapes alone
      (['--exp=ViT_T_Synthetic', f'--workdir={classifier}', '--set', 'DEPTH=1'],
       'DEPTH=2 there, 1 here')]:
    result = launch(*args, '--mode=eval')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith('launch.py: error: ')
    assert message in result.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'none')


JUDGED = ['--set', 'FID_NUM=6', '--set', 'FID_EVERY=1', '--set', 'FID_BATCH=4',
          '--set', 'JUDGE_EXP=ViT_T_Synthetic', '--set', 'FD_NAME=fd_syn',
          '--set', 'DENOISE_STEPS=2']


def test_checkpoint_of_the_former_fused_qkv_layout_is_refused_with_what_to_do():
  """Checkpoints saved with FUSED_QKV before 2026-12-03 hold one 'qkv' parameter where the
  model now has 'query', 'key', 'value': the refusal says so instead of naming a missing key."""
  import types
  from trainer import restore
  from trainer.state import TrainError
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  attn = lambda fused: ({'qkv': {'kernel': leaf(8, 3, 2, 4)}} if fused else
                        {n: {'kernel': leaf(8, 2, 4)} for n in ('query', 'key', 'value')})
  params = lambda fused: {'backbone': {'blocks': {'attn': attn(fused)}}}
  abstract = types.SimpleNamespace(params=params(False), ema=None)
  with pytest.raises(TrainError, match="one 'qkv' parameter, FUSED_QKV's layout before "
                     "2026-12-03.*knobs that differ: none recorded"):
    restore.check_compatible(5, {'experiment': 'DiT_T_FashionMNIST'}, {'params': params(True)},
                             'DiT_T_FashionMNIST', {}, abstract, 'wd/checkpoints')
  restore.check_compatible(5, {'experiment': 'DiT_T_FashionMNIST'}, {'params': params(False)},
                           'DiT_T_FashionMNIST', {}, abstract, 'wd/checkpoints')


def test_judge_loads_whichever_block_layout_it_was_trained_with(classifier, tmp_path_factory):
  """A judge saved with SCAN_LAYERS=False (as every classifier trained before the knob existed)
  is rebuilt with that layout from its checkpoint's record, whatever the experiment's default."""
  from trainer import restore
  unrolled = trained_once(tmp_path_factory, 'vit-unrolled', '--exp=ViT_T_Synthetic', *TINY,
                          '--set', 'SCAN_LAYERS=False')[0]
  assert restore.layout_overrides(classifier) == ['SCAN_LAYERS=True']
  assert restore.layout_overrides(unrolled) == ['SCAN_LAYERS=False']
  for workdir, scanned in ((classifier, True), (unrolled, False)):
    judge = restore.TrainedClassifier('ViT_T_Synthetic', workdir)
    assert judge.model.scan_layers is scanned
    assert ('blocks' in judge.params['backbone']) is scanned
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
    out = judge.features(judge.params, pixels.astype(np.float32))
    assert out['logits'].shape == (2, 10) and np.isfinite(out['features']).all()
    # the judge sees exactly what its training steps saw for the same uint8 images
    logits = judge.model.apply({'params': judge.params}, pixels_to_float(jnp.asarray(pixels)))
    np.testing.assert_array_equal(out['logits'], logits)


@pytest.fixture(scope='session')
def judged(classifier, tmp_path_factory):
  """DiT_T_Synthetic judged by the trained ViT_T_Synthetic every step: (workdir, stderr)."""
  return trained_once(tmp_path_factory, 'dit-judged', '--exp=DiT_T_Synthetic', *TINY, *JUDGED,
                      '--set', f'JUDGE_DIR={classifier}', '--set', 'SAMPLES_PER_CLASS=1',
                      '--set', 'EVAL_EVERY=2')


def test_classifier_judges_the_samples_in_training_and_eval(classifier, judged):
  """eval/fd_syn and eval/class_consistency at every step (FID_EVERY=1), the split's loss only
  at EVAL_EVERY; --mode=eval on 2 devices gives the numbers training logged on 1."""
  wd, stderr = judged
  scalars = read_scalars(os.path.join(wd, 'tensorboard'))
  assert [s for s, _ in scalars['eval/fd_syn']] == [1, 2]
  assert [s for s, _ in scalars['eval/class_consistency']] == [1, 2]
  assert [s for s, _ in scalars['eval/loss']] == [2]
  assert all(np.isfinite(v) and v > 0 for _, v in scalars['eval/fd_syn'])
  assert all(v * 6 == round(v * 6) for _, v in scalars['eval/class_consistency'])
  assert 'fd_syn=' in stderr and 'class_consistency=' in stderr   # the eval log line

  result = ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', '--mode=eval', *JUDGED,
                     '--set', f'JUDGE_DIR={classifier}', '--set', 'EVAL_BATCHES=1', devices=2))
  record = json.loads(result.stdout.strip().splitlines()[-1])
  # the EMA parameters, the same samples (fixed key) and features as the last training eval
  assert record['fd_syn'] == pytest.approx(scalars['eval/fd_syn'][-1][1], rel=1e-4)
  assert record['class_consistency'] == pytest.approx(scalars['eval/class_consistency'][-1][1],
                                                     abs=1e-6)
  assert record['loss'] == pytest.approx(scalars['eval/loss'][-1][1], rel=1e-5)
  assert record['seam_ratio'] == pytest.approx(scalars['eval/seam_ratio'][-1][1], rel=1e-6)

  # the judge's accuracy on the real eval-split images, computed here, and the ratios built on it
  from experiments import base
  import fiddle as fdl
  from trainer import evaluation, restore
  judge = restore.TrainedClassifier('ViT_T_Synthetic', classifier)
  _, cfg = base.build_config('DiT_T_Synthetic', TINY[1::2])
  source = fdl.build(cfg.eval_data)
  hits, labels, images = [], [], []
  for i in range(source.num_eval_batches()):
    batch = source.batch(i)
    real = batch['mask'] > 0
    images.append(batch['image'][real])
    pixels = evaluation.quantize(pixels_to_float(jnp.asarray(batch['image'])))
    logits = np.asarray(judge.features(judge.params, pixels)['logits'])
    hits.append(logits.argmax(-1)[real] == batch['label'][real])
    labels.append(batch['label'][real])
  hits, labels = np.concatenate(hits), np.concatenate(labels)
  assert record['real_seam_ratio'] == pytest.approx(
      looped_seam_ratio(np.concatenate(images), 4), rel=1e-9)   # DiT_T_Synthetic's 4x4 patches
  per_class = [hits[labels == k].mean() for k in range(10)]
  # FID_NUM=6 samples cover 6 of the 10 classes: the real accuracy is weighted as they are
  from trainer.sampling import spread_labels
  sampled = sorted(set(spread_labels(6, 10).tolist()))
  assert record['real_accuracy'] == pytest.approx(np.mean([per_class[k] for k in sampled]),
                                                  abs=1e-9)
  # (this two-step judge may recognise no real image of some classes: their ratio is undefined)
  candidates = [k for k in sampled if per_class[k] > 0]
  assert record['worst_class'] in (candidates or [-1])
  if candidates:
    # the worst class's ratio is at most the pooled one (a mediant lies between its terms)
    assert record['worst_class_ratio'] <= record['consistency_ratio'] + 1e-9
    assert record['consistency_ratio'] == pytest.approx(
        record['class_consistency'] / record['real_accuracy'], rel=1e-9)


def test_consistency_ratios_per_class_against_a_hand_count():
  from trainer import evaluation
  np.testing.assert_array_equal(
      evaluation.per_class_mean(np.array([1, 0, 1, 1]), np.array([0, 0, 1, 1]), 3),
      [0.5, 1.0, np.nan])
  # classes 0 and 1 were sampled (consistency 0.5 and 1.0), class 2 was not
  out = evaluation.consistency_ratios(np.array([0.5, 1.0, np.nan]), np.array([1.0, 0.8, 0.9]),
                                      overall=0.75)
  assert out['real_accuracy'] == pytest.approx(0.9)
  assert out['consistency_ratio'] == pytest.approx(0.75 / 0.9)
  assert out['worst_class'] == 0 and out['worst_class_ratio'] == pytest.approx(0.5)
  # a class never recognised in real images has no ratio; with none left there is no worst
  out = evaluation.consistency_ratios(np.array([0.5, 0.0]), np.array([0.0, 0.6]), overall=0.25)
  assert out['worst_class'] == 1 and out['worst_class_ratio'] == 0.0
  out = evaluation.consistency_ratios(np.array([0.5, np.nan]), np.array([0.0, 0.6]), 0.5)
  assert out['worst_class'] == -1 and np.isnan(out['worst_class_ratio'])
  assert np.isnan(out['consistency_ratio']) and out['real_accuracy'] == 0.0


def test_eval_mode_reports_fid_with_inception_weights(judged, tmp_path):
  """The same run judged by the FID Inception (random weights, saved as the converter would)."""
  from models import inception
  weights = str(tmp_path / 'inception.npz')
  inception.save(inception.FIDInception.random().params, weights)
  wd, _ = judged
  # 16 samples at once, as the eval split's batches of 16: one Inception compilation
  args = ['--exp=DiT_T_Synthetic', f'--workdir={wd}', '--mode=eval', '--set', 'FID_NUM=16',
          '--set', 'FID_BATCH=16', '--set', f'INCEPTION_PATH={weights}',
          '--set', 'FID_REF_NUM=16', '--set', 'EVAL_BATCHES=1', '--set', 'DENOISE_STEPS=2']
  record = json.loads(ok(launch(*args)).stdout.strip().splitlines()[-1])
  assert set(record) == {'experiment', 'step', 'params', 'loss', 'fid', 'seam_ratio',
                         'real_seam_ratio'}
  assert np.isfinite(record['fid']) and record['fid'] > 0
  assert np.isfinite(record['seam_ratio']) and record['seam_ratio'] > 0
  # the real images' ratio is over the FID_REF_NUM=16 reference images only
  from experiments import base
  import fiddle as fdl
  _, cfg = base.build_config('DiT_T_Synthetic', TINY[1::2])
  batch = fdl.build(cfg.eval_data).batch(0)
  first = batch['image'][batch['mask'] > 0][:16]
  assert record['real_seam_ratio'] == pytest.approx(looped_seam_ratio(first, 4), rel=1e-9)


def looped_seam_ratio(images, p):
  """tasks/fid.seam_ratio written out pair by pair: mean |difference| of neighbouring pixels
  across the lines of the p x p grid over the mean inside its cells, rows and columns pooled."""
  images = images.astype(np.float64)
  across, inside = [], []
  for im in (images, images.transpose(0, 2, 1, 3)):     # along rows, then along columns
    for j in range(im.shape[2] - 1):
      (across if j % p == p - 1 else inside).append(np.abs(im[:, :, j + 1] - im[:, :, j]).ravel())
  return np.concatenate(across).mean() / np.concatenate(inside).mean()


def test_fid_stats_tool_matches_a_direct_computation(tmp_path, capsys):
  from models import inception
  from tasks import fid
  from tools import fid_stats
  net = inception.FIDInception.random(seed=1)
  weights = str(tmp_path / 'inception.npz')
  inception.save(net.params, weights)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
  np.savez(tmp_path / 'b.npz', arr_0=b)             # ADM's layout
  # a's statistics computed here, b's by the tool, which also measures the distance to a's
  features = jax.jit(net.features)
  fa = np.asarray(features(net.params, jnp.asarray(a, jnp.float32)), np.float64)
  fb = np.asarray(features(net.params, jnp.asarray(b, jnp.float32)), np.float64)
  fid.save_stats(str(tmp_path / 'a_stats.npz'), fa.mean(0), np.cov(fa, rowvar=False))
  assert fid_stats.main(['--images', str(tmp_path / 'b.npz'), '--inception', weights,
                         '--batch', '8', '--out', str(tmp_path / 'b_stats.npz'),
                         '--ref', str(tmp_path / 'a_stats.npz')]) == 0
  record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert record['num'] == 6 and record['dims'] == 2048
  mu, sigma = fid.load_stats(str(tmp_path / 'b_stats.npz'))
  np.testing.assert_allclose(mu, fb.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(fb, rowvar=False), rtol=1e-3, atol=1e-5)
  expected = fid.frechet_distance(fb.mean(0), np.cov(fb, rowvar=False), fa.mean(0),
                                  np.cov(fa, rowvar=False))
  assert record['frechet_distance'] == pytest.approx(expected, rel=1e-3)
  with pytest.raises(SystemExit):
    fid_stats.parse_args(['--out', 'x.npz'])
  assert 'give --images (an .npz of images) or --exp' in capsys.readouterr().err
