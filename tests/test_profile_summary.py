"""tools/profile_summary.py: kernel time by kind from a perfetto trace, on hand-made traces whose
sums are known, and on a real trace that tools/benchmark.py --profile writes on this CPU."""
import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  spec = importlib.util.spec_from_file_location(
      'profile_summary', os.path.join(ROOT, 'tools', 'profile_summary.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ps = _module()


def _meta(pid, name, tid=None):
  e = {'ph': 'M', 'pid': pid, 'name': 'thread_name' if tid else 'process_name',
       'args': {'name': name}}
  return dict(e, tid=tid) if tid else e


def _x(pid, tid, name, ts, dur):
  return {'ph': 'X', 'pid': pid, 'tid': tid, 'name': name, 'ts': ts, 'dur': dur}


def _write(tmp_path, events):
  path = tmp_path / 'plugins' / 'profile' / 'run' / 'vm.perfetto_trace.json.gz'
  path.parent.mkdir(parents=True)
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  return path


def test_gpu_trace_sums_stream_kernels_by_kind(tmp_path):
  events = [
      _meta(1, '/host:CPU'), _meta(1, 'python', tid=10),
      _meta(2, '/device:GPU:0'), _meta(2, 'Stream #7(Compute)', tid=7),
      _meta(2, 'Stream #9(Compute)', tid=9), _meta(2, 'XLA Ops', tid=3),
      _x(1, 10, 'train_step', 0, 1000),                                  # host: not a kernel
      _x(2, 3, 'fusion.1', 0, 999),                                      # repeats the streams
      _x(2, 7, 'nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT', 0, 300),      # matmul
      _x(2, 7, 'cudnn_generated_fort_native_sdpa_sm90_flash_fprop', 300, 100),   # attention
      _x(2, 9, 'loop_multiply_fusion', 350, 100),     # overlaps: busy counts it from 400 only
      _x(2, 7, 'memcpy128', 500, 40),
      _x(2, 7, 'nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT', 600, 60),
  ]
  s = ps.summarize(ps.load_events(ps.find_trace(str(_write(tmp_path, events).parents[3]))),
                   steps=2)
  assert s['where'] == 'device' and s['kernels'] == 5
  assert s['kernel_ms_per_step'] == pytest.approx(600 / 1e3 / 2)
  assert s['busy_ms_per_step'] == pytest.approx((450 + 40 + 60) / 1e3 / 2)
  assert s['span_ms_per_step'] == pytest.approx(660 / 1e3 / 2)
  kinds = {k: t for k, t, _ in s['kinds']}
  assert kinds == pytest.approx({'matmul': 0.18, 'attention': 0.05, 'fusion': 0.05,
                                 'copy': 0.02})
  name, ms, calls, share = s['top'][0]
  assert name.startswith('nvjet') and calls == 1 and share == pytest.approx(0.6)
  assert '| matmul | 0.18 | 60.0% |' in ps.report(s)


def test_kinds_of_kernel_names():
  kinds = {name: ps.kind_of(name) for name in (
      'sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x256x32', 'gemm_fusion_dot_50',
      'cudnn_generated_fort_native_sdpa_sm90_flash_bprop', 'loop_convert_fusion',
      'wrapped_convert', 'wrapped_select', 'input_convert_reduce_fusion_1',
      'sm80_xmma_fprop_implicit_gemm_bf16', 'convolution.3', 'memcpy32_post',
      'loop_dynamic_update_slice_fusion_21', 'ncclDevKernel_AllReduce_Sum_bf16', 'cuStreamWait')}
  assert kinds == {
      'sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x256x32': 'matmul',
      'gemm_fusion_dot_50': 'matmul',
      'cudnn_generated_fort_native_sdpa_sm90_flash_bprop': 'attention',
      'loop_convert_fusion': 'fusion', 'wrapped_convert': 'fusion', 'wrapped_select': 'fusion',
      'input_convert_reduce_fusion_1': 'fusion',
      'sm80_xmma_fprop_implicit_gemm_bf16': 'convolution',
      'convolution.3': 'convolution', 'memcpy32_post': 'copy',
      'loop_dynamic_update_slice_fusion_21': 'copy',
      'ncclDevKernel_AllReduce_Sum_bf16': 'collective', 'cuStreamWait': 'other'}


def test_cpu_trace_takes_the_xla_pool_threads_without_loop_containers(tmp_path):
  events = [
      _meta(1, '/host:CPU'), _meta(1, 'tf_XLAEigen/1', tid=5), _meta(1, 'python', tid=6),
      _x(1, 5, 'ThunkExecutor::Execute', 0, 500), _x(1, 5, 'while.3', 0, 400),
      _x(1, 5, 'dot.12', 10, 100), _x(1, 5, 'add_multiply_fusion', 120, 50),
      _x(1, 6, 'dot.99', 0, 1000),                          # the Python thread: not an op
  ]
  s = ps.summarize(ps.load_events(str(_write(tmp_path, events))), steps=1)
  assert s['where'] == 'host' and s['kernels'] == 2
  assert {k: t for k, t, _ in s['kinds']} == pytest.approx({'matmul': 0.1, 'fusion': 0.05})


def test_missing_or_empty_trace_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match='--profile'):
    ps.find_trace(str(tmp_path))
  empty = _write(tmp_path, [_meta(1, '/host:CPU')])
  with pytest.raises(ValueError, match='no kernel'):
    ps.summarize(ps.load_events(str(empty)))


def test_benchmark_profile_writes_a_trace_the_summary_reads(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  prof = tmp_path / 'prof'
  bench = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'benchmark.py'), '--exp=ViT_T_Synthetic',
       '--steps', '1', '--warmup', '0', '--profile', str(prof)],
      capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
  assert bench.returncode == 0, bench.stderr[-2000:]
  assert json.loads(bench.stdout)['profile_dir'] == str(prof)
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'profile_summary.py'),
                        str(prof), '--top', '5'], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'XLA ops over 3 steps (host)' in out.stdout and '| matmul |' in out.stdout
