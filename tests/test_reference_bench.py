"""tools/reference_bench.py without the reference (it is not installed here): our side of each
family builds at the reference's shapes, its parameter count differs from the reference's by
exactly the documented differences, and the table and flags behave."""
import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name, path):
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # before exec: dataclasses look their module up there
    spec.loader.exec_module(module)
  return sys.modules[name]


rb = _module('reference_bench', 'tools/reference_bench.py')


def _ours(family):
  """(experiment, model, task, abstract params) of our side, initialised abstractly."""
  import fiddle as fdl
  import jax
  from flax import linen as nn

  from experiments import base
  name, overrides = rb.ours_overrides(family)
  exp, cfg = base.build_config(name, overrides)
  model, task = fdl.build(cfg.model), fdl.build(cfg.task)
  params = jax.eval_shape(lambda k: model.init(k, *task.init_inputs(1)), jax.random.key(0))
  return exp, model, task, nn.unbox(params['params'])


def _count(params):
  import jax
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _blocks(backbone):
  """Depth and the first block's params, unrolled (block0..) or scanned (blocks, stacked)."""
  import jax
  if 'blocks' in backbone:
    return jax.tree.leaves(backbone['blocks'])[0].shape[0], backbone['blocks']
  return sum(k.startswith('block') for k in backbone), backbone['block0']


@pytest.mark.parametrize('family', rb.FAMILIES)
def test_ours_builds_at_the_reference_shape(family):
  exp, model, task, params = _ours(family)
  assert (exp.HIDDEN, exp.DEPTH, exp.HEADS, exp.MLP_RATIO) == (256, 6, 4, 4.0)
  assert exp.DTYPE == 'float32' and exp.EMA_DECAY == 0 and exp.GRAD_CLIP == 0
  assert (exp.LR, exp.WARMUP, exp.LR_SCHEDULE) == (1e-4, 1000, 'constant')
  assert (exp.WEIGHT_DECAY, exp.ADAM_B1, exp.ADAM_B2) == (1e-3, 0.9, 0.999)
  depth, block = _blocks(params['backbone'])
  assert depth == 6
  bench = rb._benchmark_module()
  spec = bench.batch_spec(task, model, exp.GLOBAL_BATCH)
  shapes = {k: v[0] for k, v in spec.items()}
  s = rb.SHAPES[family]
  if family == 'gpt':
    assert shapes == {'tokens': (8, 257)} and exp.VOCAB_SIZE == 50257
    assert params['token_embed']['embedding'].shape[-1] == 256
  else:
    image = (s['batch'], s['image'], s['image'], s['channels'])
    assert shapes == {'image': image, 'label': (s['batch'],)}
    assert exp.NUM_CLASSES == 1000 and exp.PATCH == s['patch']
    p, c = s['patch'], s['channels']
    assert params['patch_embed']['proj']['kernel'].shape == (p * p * c, 256)
  mlp = block['mlp']['wi']['kernel'].shape
  assert mlp[-2:] == (256, 1024)


def test_param_counts_differ_from_the_reference_only_as_documented():
  """Ours minus the reference's analytic count, term by term (see the tool's docstring)."""
  d, depth = 256, 6
  exp, _, _, params = _ours('dit')
  assert _count(params) == rb.reference_param_count('dit') == 7_628_816   # identical layers
  exp, _, _, params = _ours('vit')
  # LayerNorm biases in every block, and a head norm with scale and bias where the reference's
  # ClassifierOutput norm has neither
  assert _count(params) - rb.reference_param_count('vit') == 2 * depth * d + 2 * d
  exp, _, _, params = _ours('gpt')
  multiple = getattr(exp, 'VOCAB_MULTIPLE', 1) or 1
  rows = -(-rb.VOCAB // multiple) * multiple          # our token table is padded to this
  expected = (2 * (rows - rb.VOCAB) * d               # padded rows in the table and the head
              - rb.VOCAB                              # no bias on our output Dense
              + 2 * depth * d + 2 * d)                # LayerNorm biases, final norm
  assert _count(params) - rb.reference_param_count('gpt') == expected


def test_table_has_a_row_per_family_and_failures_are_rows():
  ok = {'family': 'vit', 'ratio': 0.5, 'ratio_paired': 0.52,
        'reference': {'step_s': 1.0, 'params': 5_005_288, 'compile_s': 20.0},
        'ours': {'step_s': 2.0, 'params': 5_008_872, 'compile_s': 30.0}}
  failed = {'family': 'gpt', 'error': 'XlaRuntimeError: out of memory\nmore'}
  lines = rb.markdown_table([ok, failed]).splitlines()
  assert len(lines) == 4 and all(l.startswith('| ') for l in lines)
  assert lines[2].split('|')[1:6] == [' vit ', ' 1000.0 ', ' 2000.0 ', ' 0.50x ', ' 0.52x ']
  assert '5,005,288' in lines[2] and 'FAILED: XlaRuntimeError: out of memory' in lines[3]
  assert 'more' not in lines[3]
  assert all(l.count('|') == lines[0].count('|') for l in lines)
  assert lines[2].split('|')[6:8] == [' - ', ' - ']      # no matmul rate: no share, no ceiling
  ok.update(rb.share_of_peak(1000, 1.0e8, ok, 0.3))       # 3e11 FLOPs a step
  assert rb.markdown_table([ok]).splitlines()[2].split('|')[6:8] == [' 1.00 / 0.50 ', ' 1.00x ']


def test_share_of_peak_is_train_flops_over_time_over_the_peak():
  result = {'reference': {'step_s': 0.5}, 'ours': {'step_s': 0.4}}
  out = rb.share_of_peak(1000, 2.0e7, result, 0.2)          # 3 x 1000 x 2e7 = 6e10 FLOPs
  np.testing.assert_allclose(out['reference_tflops'], 0.12)  # 6e10 FLOPs in 0.5 s
  np.testing.assert_allclose(out['ours_tflops'], 0.15)
  np.testing.assert_allclose(out['reference_share'], 0.6)
  np.testing.assert_allclose(out['ours_share'], 0.75)
  np.testing.assert_allclose(out['ceiling'], 0.2 / 0.12)     # the most a step at the peak gains
  assert rb.share_of_peak(1000, 2.0e7, result, None) == {}   # no peak known: no share


def test_reference_dir_must_hold_the_reference(tmp_path):
  with pytest.raises(SystemExit):
    rb.parse_args(['--reference_dir', str(tmp_path)])
  (tmp_path / 'jaxtransformer').mkdir()
  (tmp_path / 'jaxtransformer' / 'transformer.py').write_text('')
  args = rb.parse_args(['--reference_dir', str(tmp_path), '--family', 'vit', '--set',
                        'SCAN_LAYERS=False'])
  assert args.family == 'vit' and args.set == ['SCAN_LAYERS=False'] and args.steps == 5
  exp, overrides = rb.ours_overrides('vit', args.set)
  assert exp == 'ViT_T_Synthetic' and overrides[-1] == 'SCAN_LAYERS=False'
