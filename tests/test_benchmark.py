"""tools/benchmark.py: one real run as a subprocess (8 fake CPU devices, so FSDP), its JSON, the
Markdown table, failures as results, --compare end to end (one device), the synthetic batch
shapes of every task kind; trainer/flops.py: the measured CPU matmul rate, and the analytic
forward FLOP count of each model family against XLA's own count."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'benchmark.py')


def _module():
  spec = importlib.util.spec_from_file_location('benchmark', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules['benchmark'] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


benchmark = _module()


def _run(*args, timeout=120, devices=8):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
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
  # knobs left to the model, as it decided them on a CPU: chunked (no memory reported), streamed
  assert r['knobs']['LOSS_CHUNK'] == 128 and r['knobs']['LOSS_VOCAB_BLOCK'] == 2048
  # GPT_T_Synthetic's einsum attention: the whole score matrix counted, no fused kernel in it
  assert r['fused_attention'] == [] and r['attention_flops'] == 'full l x l'
  for key in ('step_time_s', 'step_time_mean_s', 'step_time_pipelined_s', 'examples_per_s',
              'tokens_per_s', 'tflops_per_device', 'compile_time_s', 'param_count',
              'flops_per_example'):
    assert r[key] > 0, key
  assert r['examples_per_s'] == pytest.approx(8 / r['step_time_s'])
  assert r['tokens_per_s'] == pytest.approx(32 * r['examples_per_s'])   # SEQ_LEN 32
  # trainer/flops.py: 3 x forward FLOPs x examples/s / devices
  assert r['tflops_per_device'] == pytest.approx(
      3 * r['flops_per_example'] * r['examples_per_s'] / 8 / 1e12)
  # CPU peak: the best of two measured f32 matmul rates of one device, bracketing the steps.
  assert r['peak_source'] == 'measured matmul n=2048 float32'
  assert r['matmul_tflops_before'] > 0 and r['matmul_tflops_after'] > 0
  assert r['peak_tflops_per_device'] == max(r['matmul_tflops_before'], r['matmul_tflops_after'])
  assert r['mfu'] == pytest.approx(r['tflops_per_device'] / r['peak_tflops_per_device'])
  assert 'DTYPE' in r['knobs'] and set(r['knobs']) <= set(benchmark.REPORTED_KNOBS)
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
  assert f"{100 * gpt_result['mfu']:.1f}%" in lines[2]                     # MFU on CPU rows too
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


def test_compare_times_variants_alternately_with_ratios(tmp_path):
  out = tmp_path / 'compare.json'
  # DEPTH=1: four compiles (an init and a step per variant) are most of this test's time.
  proc = _run('--exp=GPT_T_Synthetic', '--set', 'GLOBAL_BATCH=8', '--set', 'DEPTH=1',
              '--compare', 'HIDDEN=64',
              'HIDDEN=32', '--steps', '2', '--warmup', '1', '--peak_tflops', '0.5',
              '--out', str(out), devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  a, b = report['results']
  assert report['variants'] == ['HIDDEN=64', 'HIDDEN=32'] and report['rounds'] == 2
  assert a['overrides'] == ['GLOBAL_BATCH=8', 'DEPTH=1', 'HIDDEN=64']
  assert b['knobs']['HIDDEN'] == 32 and b['knobs']['DEPTH'] == 1
  assert len(a['step_times_s']) == len(b['step_times_s']) == 2
  assert a['param_count'] > b['param_count']                    # two models, not one shared
  assert report['speed_vs_first'] == [1.0, pytest.approx(a['step_time_s'] / b['step_time_s'])]
  # --peak_tflops replaces the measured peak, and no matmul is timed
  assert a['peak_tflops_per_device'] == 0.5 and a['peak_source'] == '--peak_tflops'
  assert a['matmul_tflops_before'] is None and a['mfu'] == pytest.approx(
      a['tflops_per_device'] / 0.5)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4 and lines[3].startswith('| HIDDEN=32 | 8 |')
  assert lines[3].endswith(f"| {report['speed_vs_first'][1]:.3f}x |")
  # --summarize reads a compare report as its list of results
  assert len(benchmark.load_results([out])) == 2


def test_compare_table_marks_a_failed_variant():
  ok = {'global_batch': 8, 'step_time_s': 0.01, 'examples_per_s': 800.0,
        'tflops_per_device': 0.02, 'mfu': 0.25, 'compile_time_s': 3.0}
  report = {'variants': ['', 'NO_SUCH_KNOB=1'], 'speed_vs_first': [1.0, None],
            'results': [ok, {'error': 'ConfigError: unknown knob\nmore'}]}
  lines = benchmark.compare_table(report).splitlines()
  assert lines[2] == '| (as --set) | 8 | 10.0 | 800.0 | 0.02 | 25.0% | 3.0 | 1.000x |'
  assert 'FAILED: ConfigError: unknown knob' in lines[3] and 'more' not in lines[3]
  assert lines[0].count('|') == lines[3].count('|')


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_measure_matmul_tflops(dtype):
  import jax.numpy as jnp
  from trainer import flops
  rate = flops.measure_matmul_tflops(dtype, n=256, repeats=2)
  assert isinstance(rate, float) and 0 < rate < 1e4
  # the timed matmul is the form the models run: 16-bit operands, float32 accumulation
  x = jnp.ones((8, 8), dtype)
  hlo = flops.peak_matmul(dtype).lower(x, x).as_text()
  short = {'float32': 'f32', 'bfloat16': 'bf16'}[dtype]
  assert re.search(rf'dot_general.*\(tensor<8x8x{short}>, tensor<8x8x{short}>\) -> '
                   r'tensor<8x8xf32>', hlo), hlo


@pytest.mark.parametrize('name, extra', [
    ('DiT_T_Synthetic', []), ('ViT_T_Synthetic', []), ('GPT_T_Synthetic', []),
    # one block, so that the convolutional stem is ~17% of the count (the p x p patch's about 1%)
    ('ViT_T_FashionMNIST', ['STEM=conv', 'DEPTH=1']),
    # 21x21 windows of 7-pixel patches: the embedding ~35% of the count, 9x the plain one's
    ('ViT_T_FashionMNIST', ['EMBED_MARGIN=7', 'DEPTH=1']),
    # the decoder's 64 channels a pixel make its projection ~20% of one block's count
    ('DiT_T_FashionMNIST', ['DECODER_CONV=64', 'DECODER_OVERLAP=False', 'DEPTH=1']),
    # 14-pixel patches decoded as 28x28 blocks: the projection ~20% of the count, so a wrong
    # factor for the overlapping blocks (4x the plain decoder's outputs) would show
    ('DiT_T_FashionMNIST', ['DECODER_OVERLAP=True', 'EMBED_MARGIN=0', 'DEPTH=1', 'PATCH=14']),
    # 28x28 windows of 14-pixel patches: the embedding ~15% of the count, 4x the plain one's
    ('DiT_T_FashionMNIST', ['EMBED_MARGIN=7', 'DECODER_OVERLAP=False', 'DEPTH=1', 'PATCH=14']),
    # a grid shifted by padding runs on a canvas one 14-pixel patch larger: 9 tokens instead of
    # 4; rolled, it keeps the 4
    ('DiT_T_FashionMNIST', ['GRID_SHIFT=pad', 'DEPTH=1', 'PATCH=14']),
    ('DiT_T_FashionMNIST', ['GRID_SHIFT=roll', 'DEPTH=1', 'PATCH=14'])])
def test_analytic_forward_flops_match_xla(name, extra):
  """models/*.flops_per_example against XLA's cost analysis of the compiled forward pass.

  Both count 2 FLOPs per multiply-add; XLA also counts the elementwise work (layer norms,
  softmax exp and divide, GELU, residual adds, adaLN modulation), which the analytic count
  leaves out. At HIDDEN=256 the matmuls are ~99% of XLA's count (it reads ~1% above ours), at
  the default HIDDEN=64 ~96%; either is within the 10% asserted, which a missing or
  double-counted matmul (an MLP, the attention matrix, the head) would break.

  The backbone is unrolled: XLA's cost analysis counts the body of a while loop once, not
  times its trip count, so under SCAN_LAYERS=True it sees one block of DEPTH (at DEPTH=2 it reads
  ~52% of the analytic count, at DEPTH=4 ~26%).
  """
  import fiddle as fdl
  import jax
  import jax.numpy as jnp
  from experiments import base
  unrolled = ['SCAN_LAYERS=False'] if hasattr(base.get(name), 'SCAN_LAYERS') else []
  exp, cfg = base.build_config(name, ['HIDDEN=256', *unrolled, *extra])
  model, task = fdl.build(cfg.model), fdl.build(cfg.task)
  batch = 2
  inputs = task.init_inputs(batch)  # DiT: (x, t, y); ViT: (images,); GPT: (tokens [b, SEQ_LEN],)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *task.init_inputs(1)))['params']
  shifted = any(e.startswith('GRID_SHIFT=') for e in extra)
  kw = {'shift': jnp.ones((batch, 2), jnp.int32)} if shifted else {}
  forward = jax.jit(lambda p, *xs: model.apply({'params': p}, *xs, **kw))
  cost = forward.lower(params, *inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # a list of one dict in old jax
  xla = cost['flops'] / batch
  analytic = exp.flops_per_example()
  assert xla == pytest.approx(analytic, rel=0.1), f'XLA / analytic = {xla / analytic:.4f}'


def test_peak_fields_measured_override_and_unknown():
  measured = benchmark.peak_fields('bfloat16', {'bfloat16': 0.1}, {'bfloat16': 0.2})
  assert measured == {'peak_tflops_per_device': 0.2,
                      'peak_source': 'measured matmul n=2048 bfloat16',
                      'matmul_tflops_before': 0.1, 'matmul_tflops_after': 0.2}
  given = benchmark.peak_fields('float32', {}, {}, peak_override=3.0)
  assert given['peak_tflops_per_device'] == 3.0 and given['peak_source'] == '--peak_tflops'
  # nothing measured and no datasheet entry (a CPU here): no peak, so no MFU
  assert benchmark.peak_fields('float32', {}, {})['peak_tflops_per_device'] is None


def test_causal_attention_is_counted_as_the_fused_kernel_computes_it(monkeypatch):
  """GPT with cuDNN's causal kernel: the masked triangle (above the diagonal, counted here from
  a NumPy mask) leaves the FLOP count; the einsum/XLA paths and bidirectional models keep it.
  The training loop and the benchmark count through the same function (trainer/flops.py)."""
  import types

  import fiddle as fdl
  import numpy as np
  from experiments import base
  from layers import attentions
  from trainer import flops

  def counted(name, *sets):
    exp, cfg = base.build_config(name, list(sets))
    loop = fdl.build(cfg.loop)
    return flops.counted_forward_flops(fdl.build(cfg.model), loop.flops_per_example,
                                       loop.tokens_per_example)

  exp = base.build_config('GPT_T_Synthetic', [])[0]
  l, d, depth = exp.SEQ_LEN, exp.HIDDEN, exp.DEPTH
  masked = int(np.triu(np.ones((l, l)), 1).sum())            # entries a causal row never sees
  full = exp.flops_per_example()
  triangle = (full - depth * 2 * 2 * d * masked, flops.CAUSAL_TRIANGLE)
  assert counted('GPT_T_Synthetic', 'ATTENTION_IMPL=cudnn') == triangle
  assert counted('GPT_T_Synthetic', 'ATTENTION_IMPL=splash') == triangle
  assert counted('GPT_T_Synthetic', 'ATTENTION_IMPL=einsum') == (full, flops.FULL_ATTENTION)
  assert counted('GPT_T_Synthetic', 'ATTENTION_IMPL=auto') == (full, flops.FULL_ATTENTION)  # CPU
  vit = base.build_config('ViT_T_Synthetic', [])[0].flops_per_example()
  assert counted('ViT_T_Synthetic', 'ATTENTION_IMPL=cudnn') == (vit, flops.FULL_ATTENTION)
  # on a (stand-in) H200, auto's decision is the real one, asked at the model's own length
  gpu = types.SimpleNamespace(platform='gpu', compute_capability='9.0')
  decide = attentions.fused_kernel
  monkeypatch.setattr(attentions, 'fused_kernel', lambda q, mask=None: decide(q, mask, device=gpu))
  auto = ('GPT_T_Synthetic', 'ATTENTION_IMPL=auto', 'DTYPE=bfloat16')
  # ... and so is its trial of the kernel's gradient: on this CPU JAX refuses cuDNN ("cuDNN is
  # not detected"), so `attend` takes XLA's path, and the count keeps the whole matrix
  assert counted(*auto) == (full, flops.FULL_ATTENTION)
  monkeypatch.setattr(attentions, '_refusal', lambda *a: None)     # a cuDNN that accepts
  assert counted(*auto) == triangle
  assert counted('GPT_T_Synthetic', 'ATTENTION_IMPL=auto', 'DTYPE=float32') == (
      full, flops.FULL_ATTENTION)          # cuDNN takes 16-bit inputs: XLA's path, all of it
  assert counted(*auto, 'SEQ_LEN=31')[1] == flops.CAUSAL_TRIANGLE   # padded to 32 for cuDNN
  # on a (stand-in) TPU, splash's: a multiple of its 128-long blocks, or XLA's path
  tpu = types.SimpleNamespace(platform='tpu')
  monkeypatch.setattr(attentions, 'fused_kernel', lambda q, mask=None: decide(q, mask, device=tpu))
  assert counted(*auto, 'SEQ_LEN=256')[1] == flops.CAUSAL_TRIANGLE
  assert counted(*auto, 'SEQ_LEN=200')[1] == flops.FULL_ATTENTION
