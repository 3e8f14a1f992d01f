"""The host memory allocator of a training or benchmark process: TCMalloc where installed.

XLA's CPU runtime allocates all of a step's temporaries as one block, and frees it at the end
of the step. glibc's malloc serves a block that large (over 32 MiB, its largest mmap threshold,
or over 64 MiB from a thread's own arena) with a fresh mmap and unmaps it when freed, so every
step the kernel faults in, and zeroes, every page of it again: 72,000 page faults a step for the
ViT at the reference backbone's example config, 22,000 for GPT_T_Bible (docs/PERFORMANCE.md).
TCMalloc keeps the freed pages for the next step: GPT_T_Bible's step ran 1.24-1.30x faster, the
ViT's 1.22x or more; the small DiT's and ViT's blocks are smaller, but their training loops
still gained 1.08-1.25x.

glibc cannot be told otherwise while running: `mallopt` caps the mmap threshold at 32 MiB, and
one arena for every thread (with mmap off) removed the faults but made the two-device ViT
2.2-3.9x slower on the arena's lock. An allocator is chosen when a process starts, so `reexec`
starts the process again, once, with TCMalloc preloaded. ZOO_ALLOCATOR=system keeps glibc's malloc.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

ENV = 'ZOO_ALLOCATOR'   # 'system': keep glibc's malloc; 'tcmalloc': set by the re-exec
LIBRARY = 'tcmalloc_minimal'   # Debian's libtcmalloc-minimal4 (tools/setup.sh installs it)
# TCMalloc reports every allocation above this to stderr (default 1 GiB); a dataset held in
# memory can be larger, and the report is noise
QUIET = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 40)}


def loaded() -> bool:
  """Whether this process runs TCMalloc (mapped into it, whoever loaded it)."""
  try:
    with open('/proc/self/maps') as f:
      return 'libtcmalloc' in f.read()
  except OSError:   # not Linux
    return False


def _decide() -> tuple[str, str | None]:
  """(one line: the allocator this process runs and why, the TCMalloc library to preload or
  None)."""
  choice = os.environ.get(ENV, '')
  if choice not in ('', 'system', 'tcmalloc'):
    raise ValueError(f"{ENV}={choice!r}: set it to 'system' (glibc's malloc) or leave it unset")
  if loaded():
    return 'host allocator: TCMalloc', None
  if choice == 'system':
    return f'host allocator: glibc malloc ({ENV}=system)', None
  if choice == 'tcmalloc':   # the re-exec ran, and the loader did not take the library
    return (f'host allocator: glibc malloc (LD_PRELOAD={os.environ.get("LD_PRELOAD", "")!r} did '
            'not load TCMalloc; steps run slower, nothing else changes)'), None
  if not sys.platform.startswith('linux'):
    return 'host allocator: the system malloc (TCMalloc is preloaded on Linux only)', None
  library = ctypes.util.find_library(LIBRARY)
  if library is None:
    return ("host allocator: glibc malloc (TCMalloc is not installed: `apt-get install "
            "libtcmalloc-minimal4`, or run tools/setup.sh; each CPU step then faults its "
            "temporaries in again, docs/PERFORMANCE.md)"), None
  return 'host allocator: glibc malloc (TCMalloc installed, not preloaded)', library


def describe() -> str:
  """One line: the allocator this process runs, and why."""
  return _decide()[0]


def reexec(argv=None) -> str:
  """Start this process again with TCMalloc preloaded (never returns) where it is installed and
  not chosen against, else return `describe()`'s line. Call it first thing in a program's entry
  point, never from a library function: the whole process restarts. `argv` defaults to the
  interpreter's own command line (sys.orig_argv: its options, the script and its arguments), so
  the process runs again as it was started, with the same pid."""
  line, library = _decide()
  if library is None:
    return line
  preload = ' '.join(x for x in (library, os.environ.get('LD_PRELOAD', '')) if x)
  env = {**QUIET, **os.environ, 'LD_PRELOAD': preload, ENV: 'tcmalloc'}
  argv = list(sys.orig_argv if argv is None else argv)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
  raise AssertionError('unreachable: os.execve returned')
