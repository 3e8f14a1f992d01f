"""tools/gpu_bench.sh end to end on this CPU, so that its logic is known to work before a rare GPU
lease spends minutes on it: the workload list with knobs, an env: token and --profile, a failing
workload and a skipped one as rows of the table, the files it promises under $OUT, exit status 0."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'gpu_bench.sh')


def _run(out, timeout=300, **env):
  full = dict(os.environ, JAX_PLATFORMS='cpu', PYTHON=sys.executable, OUT=str(out),
              BENCH_CHECKS='0', BENCH_STEPS='1', BENCH_WARMUP='0',
              XLA_FLAGS='--xla_force_host_platform_device_count=8', **env)
  return subprocess.run(['bash', SCRIPT], capture_output=True, text=True, timeout=timeout,
                        env=full, cwd=ROOT)


def test_workloads_failures_and_files(tmp_path):
  proc = _run(tmp_path, BENCH_WORKLOADS='GPT_T_Synthetic GLOBAL_BATCH=8 env:ZOO_MARK=1 --profile'
                                        ';NoSuchExperiment')
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert [r['experiment'] for r in results] == ['GPT_T_Synthetic', 'NoSuchExperiment']
  gpt, missing = results
  assert 'error' not in gpt and gpt['global_batch'] == 8 and gpt['step_time_s'] > 0
  assert gpt['overrides'] == ['GLOBAL_BATCH=8', 'ZOO_MARK=1']      # the env: token is recorded
  assert 'NoSuchExperiment' in missing['error'] and 'step_time_s' not in missing
  table = (tmp_path / 'table.md').read_text().splitlines()
  assert len(table) == 4 and 'GPT_T_Synthetic' in table[2] and 'FAILED' in table[3]
  assert table[-1] in proc.stdout                                  # the table is printed last
  assert (tmp_path / 'trace_01.json.gz').stat().st_size > 0        # --profile's trace, copied
  profiles = (tmp_path / 'profiles.md').read_text()
  assert profiles.startswith('## [1] GPT_T_Synthetic') and '| kind |' in profiles
  log = (tmp_path / 'bench.log').read_text()
  assert 'devices:' in log and '-- [2] NoSuchExperiment' in log
  assert len(os.listdir(tmp_path)) <= 8                            # what the device tool returns


def test_spent_budget_skips_workloads_as_rows(tmp_path):
  proc = _run(tmp_path, BENCH_WORKLOADS='GPT_T_Synthetic', BENCH_BUDGET_S='0', timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [skipped] = json.loads((tmp_path / 'results.json').read_text())
  assert skipped['experiment'] == 'GPT_T_Synthetic'
  assert skipped['error'].startswith('skipped: time budget (BENCH_BUDGET_S=0)')
  assert 'skipped' in (tmp_path / 'table.md').read_text()
