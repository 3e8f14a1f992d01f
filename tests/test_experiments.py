"""Every registered experiment builds and dry-runs at full size; overrides and errors."""
import fiddle as fdl
import pytest

import launch
from experiments import base


ALL = sorted(base.registered())
REQUIRED = ['DiT_S_ImageNet256', 'DiT_B_ImageNet256', 'DiT_L_ImageNet256', 'DiT_XL_ImageNet256',
            'DiT_B_ImageNet', 'ViT_S_ImageNet', 'ViT_B_ImageNet', 'ViT_L_ImageNet', 'GPT_S_OWT',
            'GPT_B_OWT', 'GPT_L_OWT', 'GPT_XL_OWT', 'DiT_T_FashionMNIST', 'ViT_T_FashionMNIST',
            'GPT_T_Bible', 'DiT_T_Synthetic', 'ViT_T_Synthetic', 'GPT_T_Synthetic']


def test_required_experiments_are_registered_and_families_are_not():
  assert set(REQUIRED) <= set(ALL)
  assert not {'DiT', 'ViT', 'GPT', 'Experiment', 'FashionMNISTData'} & set(ALL)


@pytest.mark.parametrize('name', ALL)
def test_experiment_builds_and_dry_runs_at_full_size(name):
  cls = base.get(name)
  assert (cls.__dict__.get('__doc__') or '').strip(), f'{name} has no docstring of its own'
  _, cfg = base.build_config(name)
  assert isinstance(cfg, fdl.Config)
  assert launch.config_json(cfg) is not None
  table = launch.dry_run(cfg)
  params = int(table.rsplit('params: ', 1)[1])
  assert params > 0
  rows = table.splitlines()[2:-1]   # below the mesh line and the header, above params:
  sharded = any(row.endswith("'fsdp')") or "('fsdp'," in row for row in rows)
  # FSDP meshes shard the large weights; a data-parallel one (ViT_T_FashionMNIST's) shards none
  assert sharded == (dict(cls.MESH).get('fsdp', 1) != 1), table[:2000]


# What ViT_T_FashionMNIST_Judge learns from: every DiT judgement in docs/RESULTS.md was made
# with this recipe. It subclasses ViT_T_FashionMNIST, whose recipe keeps moving (its MLP ratio
# did on 2026-12-04), so a change there must be pinned in the judge, not inherited.
JUDGE_RECIPE = {
    'HIDDEN': 128, 'DEPTH': 6, 'HEADS': 4, 'MLP_RATIO': 4.0, 'PATCH': 7, 'STEM': 'patch',
    'POOL': 'cls', 'EMBED_MARGIN': 0, 'FUSED_QKV': False, 'GLOBAL_BATCH': 128, 'NUM_STEPS': 400,
    'LR': 1e-3, 'WARMUP': 40, 'LR_SCHEDULE': 'cosine', 'WEIGHT_DECAY': 0.05, 'GRAD_CLIP': 1.0,
    'ADAM_B1': 0.9, 'ADAM_B2': 0.999, 'EMA_DECAY': 0.0, 'LABEL_SMOOTHING': 0.0, 'MIXUP': 0.0,
    'SHIFT': 0, 'ERASE': 0.0, 'SEED': 0, 'DTYPE': 'float32', 'SCAN_LAYERS': True,
    'MESH': {'data': 1, 'fsdp': -1, 'tensor': 1}, 'CPU_DEVICES': 1}


def test_the_judge_keeps_the_recipe_its_judgements_were_made_with():
  exp, cfg = base.build_config('ViT_T_FashionMNIST_Judge')
  assert {k: getattr(exp, k) for k in JUDGE_RECIPE} == JUDGE_RECIPE
  assert int(launch.dry_run(cfg).rsplit('params: ', 1)[1]) == 1_197_706


def test_dit_xl_has_675m_parameters():
  _, cfg = base.build_config('DiT_XL_Synthetic')   # DiT-XL/2 on 32x32x4 latents, as the paper
  params = int(launch.dry_run(cfg).rsplit('params: ', 1)[1])
  assert abs(params / 675e6 - 1) < 0.01, params


def test_knob_override_reaches_derived_values():
  exp, cfg = base.build_config('DiT_T_Synthetic', ['HIDDEN=96', 'HEADS=3', 'NUM_STEPS=7'])
  assert cfg.model.hidden == 96 and cfg.model.heads == 3
  assert cfg.loop.num_steps == 7 and cfg.optimizer.num_steps == 7
  # FLOPs follow the knob too (derived in a method, not the class body)
  assert cfg.loop.flops_per_example == exp.flops_per_example()
  _, small = base.build_config('DiT_T_Synthetic')
  assert cfg.loop.flops_per_example > small.loop.flops_per_example


def test_dotted_override_and_literal_parsing():
  _, cfg = base.build_config('GPT_T_Synthetic', ['model.depth=1', "MESH={'fsdp': 2}",
                                                 'task.sample_prompt=hello'])
  assert cfg.model.depth == 1
  assert cfg.loop.mesh == {'fsdp': 2}
  assert cfg.task.sample_prompt == 'hello'


@pytest.mark.parametrize('name, overrides, message', [
    ('DiT_T_Synthetc', [], "Did you mean: DiT_T_Synthetic"),
    ('DiT_T_Synthetic', ['HIDEN=3'], "no knob 'HIDEN'. Did you mean: HIDDEN"),
    ('DiT_T_Synthetic', ['model.dpeth=3'], "no field 'dpeth'. Did you mean: depth"),
    ('DiT_T_Synthetic', ['HIDDEN=100', 'HEADS=3'], 'HIDDEN=100 is not divisible by HEADS=3'),
    ('DiT_T_Synthetic', ['IMAGE_SIZE=18'], 'IMAGE_SIZE=18 is not divisible by PATCH=4'),
    ('ViT_T_Synthetic', ['PATCH=5'], 'IMAGE_SIZE=16 is not divisible by PATCH=5'),
    ('nope.module.Cls', [], "cannot import module 'nope.module'"),
    ('DiT_T_Synthetic', ['NUM_STEPS'], 'expected KEY=VALUE'),
    ('DiT_T_Synthetic', ['NUM_STEPS=1e3'], 'NUM_STEPS=1000.0: NUM_STEPS takes an integer'),
    ('DiT_T_Synthetic', ['NUM_STEPS=True'], 'NUM_STEPS takes an integer'),
    ('DiT_T_Synthetic', ['LR=fast'], "LR='fast': LR takes a number"),
    ('DiT_T_Synthetic', ['MESH=4'], "MESH takes a dict such as {'fsdp': 4}"),
    ('DiT_T_Synthetic', ['USE_VAE=1'], 'USE_VAE takes True or False'),
    ('DiT_T_Synthetic', ['CKPT_EVERY=0'], 'CKPT_EVERY=0 must be at least 1'),
    ('DiT_T_Synthetic', ['SAMPLE_EVERY=-1'], 'SAMPLE_EVERY=-1 must be at least 0'),
    ('DiT_T_Synthetic', ['LR=0'], 'LR=0 must be positive'),
    ('DiT_T_Synthetic', ['EMA_DECAY=1.0'], 'EMA_DECAY=1.0 must be in [0, 1)'),
    ('ViT_T_FashionMNIST', ['SHIFT=30'], 'SHIFT=30: the largest random translation in pixels'),
    ('ViT_T_FashionMNIST', ['ERASE=1.5'], 'ERASE=1.5: the probability of erasing'),
    ('DiT_T_Synthetic', ['CFG_INTERVAL=(0.8, 0.2)'],
     'CFG_INTERVAL=(0.8, 0.2): the guided sampler times, a pair (lo, hi) with 0 <= lo < hi <= 1'),
    ('ViT_T_FashionMNIST', ['CPU_DEVICES=3'],
     'GLOBAL_BATCH=128 does not split over CPU_DEVICES=3 devices'),
    ('ViT_T_FashionMNIST', ['CPU_DEVICES=0'], 'CPU_DEVICES=0 must be at least 1'),
    ('DiT_T_FashionMNIST', ['DECODER_OVERLAP=True', 'PATCH=7'],
     'DECODER_OVERLAP needs an even PATCH (got 7) and DECODER_CONV=0 (got 0)'),
    ('DiT_T_FashionMNIST_Latent', ['GRID_SHIFT=pad'],
     'GRID_SHIFT shifts the patch grid by 0 to PATCH - 1 pixels, so it needs PATCH >= 2 (got 1)'),
    ('DiT_T_FashionMNIST', ['GRID_SHIFT=torus'], "GRID_SHIFT='torus': use one of 'none', 'pad', "
     "'roll'"),
    ('DiT_T_FashionMNIST', ['EMBED_MARGIN=-1'],
     'EMBED_MARGIN=-1: the pixels each patch embedding reaches into its neighbours, from 0 to '
     'the input size 28'),
    ('ViT_T_FashionMNIST', ['STEM=hybrid'], "STEM='hybrid': use one of 'patch', 'conv'"),
    ('ViT_T_FashionMNIST', ['EMBED_MARGIN=2', 'STEM=conv'],
     "EMBED_MARGIN=2 needs STEM='patch' (got 'conv')"),
    ('ViT_T_FashionMNIST', ['EMBED_MARGIN=29'],
     'EMBED_MARGIN=29: the pixels each patch embedding reaches into its neighbours, from 0 to '
     'IMAGE_SIZE=28'),
    ('DiT_T_Synthetic', ['LR_SCHEDULE=linear'], "LR_SCHEDULE='linear': use one of 'constant', "
     "'cosine'"),
    ('ViT_T_Synthetic', ['SCAN_LAYERS=False', 'SCAN_UNROLL=2'],
     'SCAN_UNROLL=2 unrolls the scan over the blocks: it needs SCAN_LAYERS=True'),
    ('GPT_T_Synthetic', ['SCAN_UNROLL=0'], 'SCAN_UNROLL=0 must be at least 1'),
])
def test_config_errors_name_the_problem(name, overrides, message):
  with pytest.raises(base.ConfigError) as e:
    base.build_config(name, overrides)
  assert message in str(e.value)


def test_numbers_fit_number_knobs():
  exp, cfg = base.build_config('DiT_T_Synthetic', ['LR=3', 'GRAD_CLIP=1', 'NUM_STEPS=7'])
  assert exp.LR == 3 and cfg.loop.num_steps == 7 and exp.GRAD_CLIP == 1


def test_subclass_in_user_module_registers(tmp_path, monkeypatch):
  (tmp_path / 'user_exps.py').write_text(
      'from experiments.dit import DiT_T_Synthetic\n'
      'class MyDiT(DiT_T_Synthetic):\n'
      '  """Mine."""\n'
      '  HIDDEN = 32\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  _, cfg = base.build_config('user_exps.MyDiT')
  assert cfg.model.hidden == 32
  assert 'MyDiT' in base.registered()


@pytest.mark.parametrize('name', ALL)
def test_docstring_gives_the_command(name):
  doc = ' '.join(base.get(name).__dict__['__doc__'].split())
  assert f'--exp={name}' in doc, f'{name}: its docstring should show how to run it'
