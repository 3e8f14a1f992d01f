"""Training that survives faults, end to end through launch.py: signals, non-finite steps, failing
evaluations, damaged checkpoints, a full disk, bad input (docs/FAULTS.md states the guarantees)."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.test_launch import (FAMILY_RUN, ROOT, _tree_digest, family_run, final_params,
                               launch, ok, subprocess_env)
from trainer.summaries import read_scalars


def start(*args, devices=1, shell_prefix=''):
  """launch.py in a subprocess, run through `bash -c '<shell_prefix> exec ...'`."""
  env = subprocess_env(devices)
  return subprocess.Popen(['bash', '-c', f'{shell_prefix} exec "$@"', 'bash', sys.executable,
                           os.path.join(ROOT, 'launch.py'), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Stderr:
  """Collects a process's stderr in a thread, so a test can wait for progress in it."""

  def __init__(self, proc):
    self.text = ''
    self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
    self._thread.start()

  def _read(self, proc):
    while chunk := proc.stderr.read(1):
      self.text += chunk

  def wait_for(self, needle, timeout=300):
    deadline = time.time() + timeout
    while needle not in self.text:
      assert time.time() < deadline, f'{needle!r} not seen:\n{self.text[-3000:]}'
      time.sleep(0.2)

  def join(self):
    self._thread.join(timeout=60)
    return self.text


@pytest.mark.parametrize('sig, status', [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_resumes(sig, status, tmp_path):
  wd = str(tmp_path / 'wd')
  args = ['--exp=ViT_T_Synthetic', f'--workdir={wd}', '--set', 'LOG_EVERY=1',
          '--set', 'CKPT_EVERY=1000', '--set', 'EVAL_BATCHES=1']
  proc = start(*args, '--set', 'NUM_STEPS=100000')
  err = Stderr(proc)
  err.wait_for('| 3/100000 [')   # the progress bar: three steps done
  proc.send_signal(sig)
  assert proc.wait(timeout=120) == status, err.join()[-3000:]
  text = err.join()
  stopped = [l for l in text.splitlines() if l.startswith('launch.py: stopped by')]
  assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], text[-3000:]
  step = int(stopped[0].split(' at step ')[1].split()[0])
  assert 3 <= step < 100000
  assert os.listdir(os.path.join(wd, 'checkpoints')) == [str(step)]
  logged = [s for s, _ in read_scalars(os.path.join(wd, 'tensorboard'))['learning/loss']]
  assert logged[-1] == step    # the last step's metrics were written before stopping
  if sig == signal.SIGTERM:
    again = ok(launch(*args, '--set', f'NUM_STEPS={step + 1}'))
    assert f'Resuming from step {step}' in again.stderr
    assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == sorted([str(step),
                                                                          str(step + 1)])


FAULTY = '''
import fiddle as fdl
import numpy as np

from experiments.vit import ViT_T_Synthetic
from input.synthetic import SyntheticImages


class NaNAtStep3(SyntheticImages):
  def batch(self, step):
    out = super().batch(step)
    if step == 2:          # the third step's images
      out['image'] = out['image'] * np.nan
    return out


class FailingEval(SyntheticImages):
  def batch(self, step):
    raise RuntimeError('planted evaluation failure')


class FaultyViT(ViT_T_Synthetic):
  """A NaN batch at step 3 and an evaluation that always fails."""
  NUM_STEPS = 6
  LOG_EVERY = 1
  EVAL_EVERY = 2
  CKPT_EVERY = 3

  def train_data(self):
    cfg = super().train_data()
    fdl.update_callable(cfg, NaNAtStep3)
    return cfg

  def eval_data(self):
    cfg = super().eval_data()
    fdl.update_callable(cfg, FailingEval)
    return cfg
'''


def test_nan_batch_is_skipped_and_a_failing_evaluation_is_logged(tmp_path):
  (tmp_path / 'faulty.py').write_text(FAULTY)
  wd = str(tmp_path / 'wd')
  out = ok(launch('--exp=faulty.FaultyViT', f'--workdir={wd}', extra_path=str(tmp_path)))
  assert 'step 3: non-finite loss or gradients' in out.stderr
  scalars = read_scalars(os.path.join(wd, 'tensorboard'))
  assert [v for _, v in scalars['learning/skipped_steps']] == [0, 0, 1, 1, 1, 1]
  loss = dict(scalars['learning/loss'])
  assert np.isnan(loss[3]) and np.isfinite([loss[s] for s in (1, 2, 4, 5, 6)]).all()
  # every evaluation failed with its traceback logged, and training went on to the end
  for step in (2, 4, 6):
    assert f'evaluation at step {step} failed; training goes on' in out.stderr
  assert out.stderr.count('RuntimeError: planted evaluation failure') == 3
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['3', '6']
  for step in (3, 6):
    assert all(np.isfinite(v).all() for v in final_params(wd, step).values())


def test_absurd_learning_rate_stops_with_finite_checkpoints(tmp_path):
  wd = str(tmp_path / 'wd')
  result = launch('--exp=ViT_T_Synthetic', f'--workdir={wd}', '--set', 'LR=1e30',
                  '--set', 'MAX_BAD_STEPS=3', '--set', 'CKPT_EVERY=1', '--set', 'NUM_STEPS=50')
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('launch.py: error:')]
  assert len(errors) == 1 and '3 consecutive steps' in errors[0], result.stderr[-3000:]
  assert '(MAX_BAD_STEPS=3)' in errors[0] and 'Lower the learning rate (LR, now ' in errors[0]
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints')))
  assert steps and steps[-1] < 50
  for step in steps:
    assert all(np.isfinite(v).all() for v in final_params(wd, step).values())


def test_damaged_checkpoints_are_moved_aside_and_the_intact_one_resumed(tmp_path,
                                                                         tmp_path_factory):
  """Also the check that a resumed run is the uninterrupted one: a DiT (noise and times drawn
  per step, EMA parameters) resumed from step 3 ends at step 6 with the same parameters."""
  reference, _ = family_run(tmp_path_factory, 'DiT_T_Synthetic')   # checkpoints 3 and 6
  wd = str(tmp_path / 'wd')
  shutil.copytree(reference, wd)
  shutil.rmtree(os.path.join(wd, 'tensorboard'))
  ckpts = os.path.join(wd, 'checkpoints')
  # step 6 truncated mid-file, as after a crash; an empty step 7; a save Orbax never finished
  state = os.path.join(ckpts, '6', 'state')
  files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)
  os.makedirs(os.path.join(ckpts, '7'))
  os.makedirs(os.path.join(ckpts, '8.orbax-checkpoint-tmp', 'state'))
  out = ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', *FAMILY_RUN, devices=4))
  assert 'checkpoint of step 7' in out.stderr and 'checkpoint of step 6' in out.stderr
  assert 'Resuming from step 3' in out.stderr
  aside = sorted(os.listdir(ckpts + '.corrupt'))
  assert [a.split('-')[0] for a in aside] == ['6', '7']
  assert os.path.getsize(os.path.join(ckpts + '.corrupt', aside[0], 'state',
                                      os.path.relpath(largest, state)))   # kept, not deleted
  # the run continued from step 3 exactly as the undamaged one did
  got = dict(read_scalars(os.path.join(wd, 'tensorboard'))['learning/loss'])
  want = dict(read_scalars(os.path.join(reference, 'tensorboard'))['learning/loss'])
  assert sorted(got) == [4, 5, 6]
  np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [want[s] for s in (4, 5, 6)],
                             rtol=0, atol=1e-6)
  a, b = final_params(reference, 6), final_params(wd, 6)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)


# A write past 100 kB fails with EFBIG, as on a full disk a write fails with ENOSPC (the signal
# that would kill the process instead is ignored). Compilations are not written to the session's
# shared cache: they would be truncated there, and every later test would recompile them.
SMALL_FILES = "trap '' XFSZ; ulimit -f 98; export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1e9;"


def test_failed_save_is_a_clear_error_and_keeps_the_previous_checkpoints(tmp_path,
                                                                         tmp_path_factory):
  reference, _ = family_run(tmp_path_factory, 'ViT_T_Synthetic')
  wd = str(tmp_path / 'wd')
  shutil.copytree(reference, wd)
  before = {s: _tree_digest(os.path.join(wd, 'checkpoints', s)) for s in ('3', '6')}
  proc = start('--exp=ViT_T_Synthetic', f'--workdir={wd}', '--set', 'NUM_STEPS=7',
               '--set', 'GLOBAL_BATCH=8', '--set', 'EVAL_BATCHES=1', devices=4,
               shell_prefix=SMALL_FILES)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 1, stderr[-3000:]
  errors = [l for l in stderr.splitlines() if l.startswith('launch.py: error:')]
  assert len(errors) == 1, stderr[-3000:]
  assert 'SaveError: writing the checkpoint of step 7' in errors[0], errors[0]
  # the failed write's in-flight siblings are not echoed hundreds of times around that line
  assert 'Event loop is closed' not in stderr and 'never retrieved' not in stderr, stderr[-3000:]
  assert 'File too large' in errors[0]
  assert 'steps [3, 6] are intact' in errors[0]
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints')))[:2] == ['3', '6']
  assert '7' not in os.listdir(os.path.join(wd, 'checkpoints'))
  assert {s: _tree_digest(os.path.join(wd, 'checkpoints', s)) for s in ('3', '6')} == before
  # and the rerun without the limit resumes from the intact step 6
  again = ok(launch('--exp=ViT_T_Synthetic', f'--workdir={wd}', '--set', 'NUM_STEPS=7',
                    '--set', 'GLOBAL_BATCH=8', '--set', 'EVAL_BATCHES=1', devices=4))
  assert 'Resuming from step 6' in again.stderr


def test_out_of_vocabulary_tokens_stop_with_the_knob_to_fix(tmp_path):
  result = launch('--exp=GPT_T_Bible', f'--workdir={tmp_path / "wd"}', '--set', 'VOCAB_SIZE=500',
                  '--set', 'NUM_STEPS=2')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('launch.py: error:')]
  assert len(errors) == 1 and 'training batch 0: token id' in errors[0]
  assert "outside the model's vocabulary of 500 (VOCAB_SIZE); set VOCAB_SIZE=" in errors[0]
  assert not os.path.exists(tmp_path / 'wd' / 'checkpoints' / '1')


@pytest.mark.parametrize('workdir, message', [
    ('a_file', 'is a file, not a directory'),
    ('a_file/below', 'cannot be written'),
])
def test_unusable_workdir_fails_in_one_line(workdir, message, tmp_path):
  (tmp_path / 'a_file').write_text('not a directory')
  result = launch('--exp=ViT_T_Synthetic', f'--workdir={tmp_path / workdir}')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('launch.py: error:')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert (tmp_path / 'a_file').read_text() == 'not a directory'
