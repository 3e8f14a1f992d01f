"""The workdir: where it lives, whether it can be written, and the record of every invocation.

A workdir is a local directory (made absolute, so that every process of a run means the same
one) or a URL such as `gs://bucket/run`, which stays a URL: Orbax, the summary writer and
`etils.epath` (the path library used here) all take it. epath reaches a bucket through its file
system package (`pip install gcsfs` for gs://); no test here writes to a real bucket.
"""
from __future__ import annotations

import datetime
import os
import re
import shlex
import uuid

from etils import epath

_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


class WorkdirError(OSError):
  """The workdir cannot be used; the message says why and what to do."""


def is_url(path: str) -> bool:
  return bool(_URL.match(str(path)))


def resolve(path: str) -> str:
  """A URL unchanged (less a trailing slash); a local path absolute, with ~ expanded."""
  path = str(path)
  if is_url(path):
    return path.rstrip('/')
  return os.path.abspath(os.path.expanduser(path))


def join(workdir: str, *parts: str) -> str:
  return '/'.join([workdir.rstrip('/'), *parts]) if is_url(workdir) else os.path.join(
      workdir, *parts)


def check_writable(workdir: str) -> None:
  """Creates `workdir` and proves a file can be written there (then removed), or raises
  WorkdirError naming the path and the problem, before anything else is written."""
  if not is_url(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pass a directory '
                       '(it is created if missing)')
  probe = epath.Path(workdir) / f'.write-test-{uuid.uuid4().hex[:8]}'
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:   # OSError locally; each cloud file system raises its own kind
    raise WorkdirError(f'--workdir={workdir} cannot be written ({type(e).__name__}: {e}); '
                       'pick a directory this user can create and write') from None


def write_text(path: str, text: str) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def write_bytes(path: str, data: bytes) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def record_invocation(workdir: str, config_text: str, argv: list[str], step: int) -> None:
  """Appends this invocation's command line and resolved config to WORKDIR/config.txt, so a
  resumed run with other knobs (more steps, another LR) keeps the history of what ran when."""
  path = epath.Path(workdir) / 'config.txt'
  before = path.read_text() if path.exists() else ''
  when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
  header = (f'# ---- {when}, {"resuming at step " + str(step) if step else "from scratch"}: '
            f'{shlex.join(argv)}\n')
  write_text(str(path), before + ('\n' if before else '') + header + config_text + '\n')
