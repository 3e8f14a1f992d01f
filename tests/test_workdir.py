"""Workdir paths (local or URL), the write check, and the record of every invocation."""
import os

import pytest

from trainer import workdir


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  assert workdir.resolve('gs://bucket/run/') == 'gs://bucket/run'
  assert workdir.resolve('s3://b/r') == 's3://b/r'
  assert workdir.is_url('gs://bucket/run') and not workdir.is_url('/data/gs:/run')
  assert workdir.join('gs://bucket/run', 'checkpoints') == 'gs://bucket/run/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert workdir.resolve('runs/a') == str(tmp_path / 'runs' / 'a')
  assert workdir.resolve('gs:/looks/local') == str(tmp_path / 'gs:' / 'looks' / 'local')
  assert workdir.join(str(tmp_path), 'a', 'b') == os.path.join(str(tmp_path), 'a', 'b')


def test_check_writable(tmp_path):
  target = tmp_path / 'new' / 'run'
  workdir.check_writable(str(target))
  assert target.is_dir() and os.listdir(target) == []     # the probe file is gone again
  (tmp_path / 'file').write_text('x')
  with pytest.raises(workdir.WorkdirError, match='is a file, not a directory'):
    workdir.check_writable(str(tmp_path / 'file'))
  with pytest.raises(workdir.WorkdirError, match='cannot be written'):
    workdir.check_writable(str(tmp_path / 'file' / 'below'))


def test_record_invocation_appends(tmp_path):
  workdir.record_invocation(str(tmp_path), 'model.depth: int = 2', ['launch.py', '--exp=A'], 0)
  workdir.record_invocation(str(tmp_path), 'model.depth: int = 2\nloop.num_steps: int = 9',
                            ['launch.py', '--exp=A', '--set', 'NUM_STEPS=9'], 4)
  text = (tmp_path / 'config.txt').read_text()
  headers = [l for l in text.splitlines() if l.startswith('# ---- ')]
  assert len(headers) == 2
  assert headers[0].endswith('from scratch: launch.py --exp=A')
  assert headers[1].endswith('resuming at step 4: launch.py --exp=A --set NUM_STEPS=9')
  assert text.count('model.depth: int = 2') == 2 and 'loop.num_steps: int = 9' in text
