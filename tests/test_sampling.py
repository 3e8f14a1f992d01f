"""launch.py --mode=sample on a tiny trained DiT: the file, its determinism, and the errors."""
import os

import numpy as np
import pytest

from tests.test_launch import FAMILY_RUN, family_run, launch, ok, trained_once
from trainer.sampling import spread_labels

TINY = ['--set', 'NUM_STEPS=2', '--set', 'CKPT_EVERY=2', '--set', 'EVAL_BATCHES=1',
        '--set', 'SAMPLES_PER_CLASS=1', '--set', 'DENOISE_STEPS=2']


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """A tiny DiT run, asked for FID with no Inception weights (it warns once and trains on):
  (workdir, stderr)."""
  return trained_once(tmp_path_factory, 'dit', '--exp=DiT_T_Synthetic', *TINY,
                      '--set', 'FID_NUM=4', '--set', 'INCEPTION_PATH=absent/inception.npz')


@pytest.fixture(scope='session')
def trained(trained_run):
  return trained_run[0]


def test_missing_inception_weights_warn_once_and_training_goes_on(trained_run):
  trained, stderr = trained_run
  warnings = [line for line in stderr.splitlines() if 'eval/fid is off' in line]
  assert len(warnings) == 1 and 'absent/inception.npz' in warnings[0], stderr[-2000:]
  assert 'convert_inception.py' in warnings[0]
  from trainer.summaries import read_scalars
  scalars = read_scalars(os.path.join(trained, 'tensorboard'))
  assert 'eval/loss' in scalars and 'eval/fid' not in scalars
  assert os.path.isdir(os.path.join(trained, 'checkpoints', '2'))


def snapshot(directory):
  return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
          for r, _, files in os.walk(directory) for f in files}


def test_labels_spread_evenly_over_the_classes():
  assert spread_labels(12, 10).tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
  assert np.bincount(spread_labels(3000, 1000)).tolist() == [3] * 1000
  assert spread_labels(4, 1000).tolist() == [0, 250, 500, 750]


def test_sample_writes_the_images_deterministically_and_reads_only(trained, tmp_path):
  before = snapshot(trained)
  args = ['--exp=DiT_T_Synthetic', f'--workdir={trained}', '--mode=sample', '--num_samples=7',
          '--set', 'DENOISE_STEPS=2']
  out = ok(launch(*args, f'--out={tmp_path / "a.npz"}', devices=2))
  assert '7 samples of step 2' in out.stdout
  a = np.load(tmp_path / 'a.npz')
  assert a['images'].shape == (7, 16, 16, 3) and a['images'].dtype == np.uint8
  assert a['labels'].tolist() == spread_labels(7, 10).tolist()
  assert len(np.unique(a['images'].reshape(7, -1), axis=0)) == 7   # not one image repeated
  from PIL import Image
  # 3 x 3 cells of 16-pixel images shown 6x (96 pixels)
  assert np.asarray(Image.open(tmp_path / 'a.png')).shape == (3 * 97 + 1, 3 * 97 + 1, 3)
  # the same command gives the same bytes, on another device count too; another SEED does not
  ok(launch(*args, f'--out={tmp_path / "b.npz"}', devices=1))
  np.testing.assert_array_equal(np.load(tmp_path / 'b.npz')['images'], a['images'])
  ok(launch(*args, '--set', 'SEED=1', f'--out={tmp_path / "c.npz"}'))
  assert not np.array_equal(np.load(tmp_path / 'c.npz')['images'], a['images'])
  assert snapshot(trained) == before


@pytest.mark.parametrize('args, message', [
    (['--exp=DiT_T_Synthetic', '--out=x.npz'], 'no checkpoints in '),
    (['--exp=DiT_T_FashionMNIST', '--out=x.npz'],
     'not DiT_T_FashionMNIST: pass --exp=DiT_T_Synthetic to read that run'),
    (['--exp=DiT_T_Synthetic', '--out=x.npz', '--set', 'HIDDEN=32'],
     'HIDDEN=64 there, 32 here'),
    (['--exp=ViT_T_Synthetic', '--out=x.npz'], 'draws no images'),
    (['--exp=DiT_T_Synthetic'], '--mode=sample needs --out=PATH'),
])
def test_sample_errors_are_one_line(trained, tmp_path, args, message):
  workdir = str(tmp_path / 'empty') if 'no checkpoints' in message else trained
  result = launch(*args, f'--workdir={workdir}', '--mode=sample')
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('launch.py: error: ') and message in lines[-1], lines[-3:]
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'empty')


def test_gpt_continues_held_out_prompts(tmp_path, tmp_path_factory):
  import json
  wd, _ = family_run(tmp_path_factory, 'GPT_T_Synthetic')   # its checkpoints are only read
  args = ['--exp=GPT_T_Synthetic', f'--workdir={wd}', *FAMILY_RUN, '--mode=sample',
          '--num_samples=5', '--set', 'SAMPLE_TOKENS=6', '--set', 'TOP_P=0.9']
  out = ok(launch(*args, f'--out={tmp_path / "a.jsonl"}', devices=2))
  assert '5 continuations of step 6' in out.stdout
  records = [json.loads(line) for line in (tmp_path / 'a.jsonl').read_text().splitlines()]
  assert len(records) == 5
  from input.synthetic import SyntheticTokens
  held_out = SyntheticTokens(8, 32, train=False).batch(0)['tokens']   # GPT_T_Synthetic's split
  for r, row in zip(records, held_out):
    assert r['prompt_tokens'] == row[:16].tolist() and len(r['tokens']) == 6
    assert isinstance(r['continuation'], str)
  ok(launch(*args, f'--out={tmp_path / "b.jsonl"}'))
  assert (tmp_path / 'b.jsonl').read_text() == (tmp_path / 'a.jsonl').read_text()

  # --mode=eval on the same checkpoint: held-out loss, accuracy and perplexity = exp(loss)
  out = ok(launch('--exp=GPT_T_Synthetic', f'--workdir={wd}', *FAMILY_RUN, '--mode=eval',
                  '--set', 'EVAL_BATCHES=2', '--set', 'SAMPLE_TOKENS=4'))
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(record) == {'experiment', 'step', 'params', 'loss', 'accuracy', 'perplexity'}
  assert record['perplexity'] == pytest.approx(np.exp(record['loss']), rel=1e-6)
  assert record['step'] == 6 and 0 <= record['accuracy'] <= 1
  assert 'held-out continuations' in out.stderr


def test_top_p_keeps_the_smallest_set_holding_p():
  import jax
  import jax.numpy as jnp
  from tasks.language import sample_logits
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]] * 4000))
  draws = np.asarray(sample_logits(jax.random.key(0), logits, 1.0, top_p=0.7))
  # 0.5 alone holds less than 0.7, 0.5 + 0.3 holds it: tokens 1 and 3, renormalised 5:3
  assert set(draws.tolist()) == {1, 3}
  assert abs((draws == 1).mean() - 0.625) < 0.03
  assert set(np.asarray(sample_logits(jax.random.key(1), logits, 1.0, top_p=0.4)).tolist()) == {1}
