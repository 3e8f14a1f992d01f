"""trainer/allocator.py: TCMalloc preloaded by one re-exec, and what it is for (page faults)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_launch import launch, ok
from trainer import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted step whose XLA temporaries (50 MiB, past any mmap threshold of glibc's; at 32 MiB its
# dynamic threshold sometimes kept them) glibc serves by mmap: run a few times, it reports the
# minor page faults of each later run and the allocator it ran with.
PROBE = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {root!r})
    from trainer import allocator
    allocator.reexec()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.cos(jnp.sin(x) @ x) @ jnp.tanh(x)))
    x = jnp.ones((2560, 2560)) * 0.01
    for _ in range(3):
      jax.block_until_ready(f(x))
    faults = []
    for _ in range(5):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({{'allocator': allocator.describe(), 'faults': faults}}))
""")


def _probe(tmp_path, **env):
  script = tmp_path / 'probe.py'
  script.write_text(PROBE.format(root=ROOT))
  # no compilation cache: its writes would add faults of their own
  env = {k: v for k, v in dict(os.environ, JAX_PLATFORMS='cpu', **env).items()
         if v is not None and not k.startswith('JAX_COMPILATION_CACHE')}
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tcmalloc_keeps_a_steps_temporaries_where_glibc_faults_them_in_again(tmp_path):
  """The re-exec really preloads TCMalloc (tools/setup.sh installs it), and it does what it is
  there for: glibc maps a step's 50 MiB of temporaries afresh every run (12,800 pages), TCMalloc
  reuses them."""
  glibc = _probe(tmp_path, ZOO_ALLOCATOR='system', LD_PRELOAD=None)
  tcmalloc = _probe(tmp_path, ZOO_ALLOCATOR=None, LD_PRELOAD=None)
  assert glibc['allocator'] == 'host allocator: glibc malloc (ZOO_ALLOCATOR=system)'
  assert tcmalloc['allocator'] == 'host allocator: TCMalloc'
  # medians of five runs: another thread of the process may fault a few pages in any one run
  # (seen: up to 6,560 in one run under TCMalloc, medians 4-320; glibc 12,800 every run)
  glibc_faults, tcmalloc_faults = (sorted(r['faults'])[2] for r in (glibc, tcmalloc))
  assert glibc_faults > 8192, glibc                          # 32 MiB of 4 KiB pages at least
  assert tcmalloc_faults < glibc_faults / 10, (tcmalloc, glibc)


def test_launch_runs_with_tcmalloc_or_says_why_not():
  out = ok(launch('--exp=ViT_T_FashionMNIST', '--dry_run', env={'ZOO_ALLOCATOR': ''}))
  assert 'host allocator: TCMalloc' in out.stderr
  out = ok(launch('--exp=ViT_T_FashionMNIST', '--dry_run', env={'ZOO_ALLOCATOR': 'system'}))
  assert 'host allocator: glibc malloc (ZOO_ALLOCATOR=system)' in out.stderr
  bad = launch('--exp=ViT_T_FashionMNIST', '--dry_run', env={'ZOO_ALLOCATOR': 'jemalloc'})
  assert bad.returncode == 2
  assert "error: ZOO_ALLOCATOR='jemalloc': set it to 'system'" in bad.stderr


@pytest.fixture
def execs(monkeypatch):
  """os.execve captured instead of run; glibc's malloc in this process, TCMalloc installed."""
  calls = []
  def execve(path, argv, env):
    calls.append((path, argv, env))
    raise SystemExit('exec')
  monkeypatch.setattr(os, 'execve', execve)
  monkeypatch.setattr(allocator, 'loaded', lambda: False)
  monkeypatch.setattr(allocator.ctypes.util, 'find_library',
                      lambda name: f'lib{name}.so.4' if name == allocator.LIBRARY else None)
  monkeypatch.setattr(sys, 'platform', 'linux')
  for name in (allocator.ENV, 'LD_PRELOAD'):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_reexec_preloads_tcmalloc_once_keeping_the_command_and_other_preloads(execs,
                                                                                monkeypatch):
  monkeypatch.setenv('LD_PRELOAD', 'libmine.so')
  with pytest.raises(SystemExit, match='exec'):
    allocator.reexec(['python3', '-u', 'launch.py', '--exp=X'])
  (path, argv, env), = execs
  assert path == sys.executable and argv == [sys.executable, '-u', 'launch.py', '--exp=X']
  assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4 libmine.so'
  assert env[allocator.ENV] == 'tcmalloc'
  assert env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == str(1 << 40)
  # the restarted process, where the loader did not take the library: no second restart
  monkeypatch.setenv(allocator.ENV, 'tcmalloc')
  assert 'did not load TCMalloc' in allocator.reexec(['python3', 'launch.py'])
  assert len(execs) == 1


def test_reexec_leaves_glibc_when_asked_or_when_tcmalloc_is_missing(execs, monkeypatch):
  monkeypatch.setenv(allocator.ENV, 'system')
  assert allocator.reexec() == 'host allocator: glibc malloc (ZOO_ALLOCATOR=system)'
  monkeypatch.delenv(allocator.ENV)
  monkeypatch.setattr(allocator.ctypes.util, 'find_library', lambda name: None)
  assert 'apt-get install libtcmalloc-minimal4' in allocator.reexec()
  monkeypatch.setattr(allocator, 'loaded', lambda: True)     # preloaded by the user already
  assert allocator.reexec() == 'host allocator: TCMalloc'
  monkeypatch.setenv(allocator.ENV, 'jemalloc')
  with pytest.raises(ValueError, match="ZOO_ALLOCATOR='jemalloc': set it to 'system'"):
    allocator.describe()
  assert execs == []
