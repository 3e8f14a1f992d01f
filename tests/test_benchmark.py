"""tools/benchmark.py: one real run as a subprocess (8 fake CPU devices, so FSDP), its JSON, the
Markdown table, failures as results, and the synthetic batch shapes of every task kind."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'benchmark.py')


def _module():
  spec = importlib.util.spec_from_file_location('benchmark', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


benchmark = _module()


def _run(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope='module')
def gpt_result(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'gpt.json'
  proc = _run('--exp=GPT_T_Synthetic', '--set', 'GLOBAL_BATCH=8', '--steps', '2', '--warmup', '1',
              '--out', str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout)
  assert json.loads(out.read_text()) == printed
  return printed


def test_result_has_every_field_with_sane_values(gpt_result):
  r = gpt_result
  for key in ('experiment', 'overrides', 'devices', 'platform', 'jax_version', 'global_batch',
              'step_time_s', 'step_time_mean_s', 'examples_per_s', 'tokens_per_s',
              'tflops_per_device', 'mfu', 'peak_memory_bytes', 'param_count', 'compile_time_s'):
    assert key in r, key
  assert r['experiment'] == 'GPT_T_Synthetic' and r['overrides'] == ['GLOBAL_BATCH=8']
  assert r['devices']['count'] == 8 and r['platform'] == 'cpu' and r['mesh']['fsdp'] == 8
  assert r['global_batch'] == 8 and len(r['step_times_s']) == 2
  for key in ('step_time_s', 'step_time_mean_s', 'step_time_pipelined_s', 'examples_per_s',
              'tokens_per_s', 'tflops_per_device', 'compile_time_s', 'param_count',
              'flops_per_example'):
    assert r[key] > 0, key
  assert r['examples_per_s'] == pytest.approx(8 / r['step_time_s'])
  assert r['tokens_per_s'] == pytest.approx(32 * r['examples_per_s'])   # SEQ_LEN 32
  # trainer/flops.py: 3 x forward FLOPs x examples/s / devices
  assert r['tflops_per_device'] == pytest.approx(
      3 * r['flops_per_example'] * r['examples_per_s'] / 8 / 1e12)
  assert r['mfu'] is None and r['peak_tflops_per_device'] is None          # no CPU peak
  assert r['loss_finite']


def test_table_of_results_and_failures(gpt_result, tmp_path):
  failed = {'experiment': 'DiT_XL_Synthetic', 'overrides': ['ATTENTION_IMPL=cudnn'],
            'error': 'XlaRuntimeError: RESOURCE_EXHAUSTED: out of memory\nmore'}
  path = tmp_path / 'all.json'
  path.write_text(json.dumps([gpt_result, failed]))
  table = benchmark.markdown_table(benchmark.load_results([path]))
  lines = table.splitlines()
  assert len(lines) == 4 and all(l.startswith('| ') for l in lines)
  assert lines[0].count('|') == lines[2].count('|') == lines[3].count('|')
  assert 'GPT_T_Synthetic' in lines[2] and '8x cpu' in lines[2]
  assert 'FAILED: XlaRuntimeError: RESOURCE_EXHAUSTED' in lines[3] and 'more' not in lines[3]


def test_failure_is_a_result_with_exit_status_1(tmp_path):
  out = tmp_path / 'bad.json'
  proc = _run('--exp=GPT_T_Synthetic', '--set', 'NO_SUCH_KNOB=1', '--out', str(out))
  assert proc.returncode == 1
  r = json.loads(out.read_text())
  assert r['experiment'] == 'GPT_T_Synthetic' and 'NO_SUCH_KNOB' in r['error']


@pytest.mark.parametrize('name,expected', [
    ('GPT_T_Synthetic', {'tokens': ((4, 33), 'int32', 512)}),
    ('ViT_T_Synthetic', {'image': ((4, 16, 16, 3), 'float32', None),
                         'label': ((4,), 'int32', 10)}),
    ('DiT_XL_Synthetic', {'image': ((4, 32, 32, 4), 'float32', None),
                          'label': ((4,), 'int32', 1000)}),
])
def test_synthetic_batch_shapes(name, expected):
  import fiddle as fdl
  from experiments import base
  _, cfg = base.build_config(name)
  spec = benchmark.batch_spec(fdl.build(cfg.task), fdl.build(cfg.model), 4)
  got = {k: (shape, str(dtype.dtype if hasattr(dtype, 'dtype') else dtype), high)
         for k, (shape, dtype, _, high) in spec.items()}
  assert got == expected
