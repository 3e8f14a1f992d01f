"""models/vae.py against diffusers' own (torch) AutoencoderKL, on tiny random configs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import vae

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

TOL = 1e-4   # the bound: max abs error in float32

# three shapes of the network: several resnets per level; GroupNorm with a non-default group
# count; three levels (downsampling by 4), plus the switches that drop layers
CONFIGS = {
    'layers2': dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32),
    'groups8': dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                    latent_channels=3),
    'levels3': dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=16),
    'bare': dict(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=4,
                 use_quant_conv=False, use_post_quant_conv=False,
                 mid_block_add_attention=False, scaling_factor=0.5, shift_factor=0.1),
}


def diffusers_vae(seed=0, **kw):
  """A random diffusers AutoencoderKL: default init, then every norm and bias perturbed so that
  a mis-mapped scale or bias shows."""
  levels = len(kw['block_out_channels'])
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * levels,
                                  up_block_types=('UpDecoderBlock2D',) * levels, **kw)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def save(model, directory):
  model.save_pretrained(directory, safe_serialization=True)
  return str(directory)


def torch_encode(model, images):
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
  return (dist.mean.numpy().transpose(0, 2, 3, 1), dist.logvar.numpy().transpose(0, 2, 3, 1))


def torch_decode(model, z):
  with torch.no_grad():
    out = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_encode_and_decode_match_diffusers(name, tmp_path):
  ref = diffusers_vae(**CONFIGS[name])
  model, params = vae.from_pretrained(save(ref, tmp_path / name))
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))(
      params, images)
  ref_mean, ref_logvar = torch_encode(ref, images)
  f = model.config.downsample
  assert mean.shape == logvar.shape == (2, 24 // f, 24 // f, model.config.latent_channels)
  np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(logvar), ref_logvar, rtol=0, atol=TOL)
  assert np.abs(ref_mean).max() > 0.05   # not trivially small

  z = rng.standard_normal(ref_mean.shape).astype(np.float32)
  decoded = jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode'))(params, z)
  assert decoded.shape == images.shape
  np.testing.assert_allclose(np.asarray(decoded), torch_decode(ref, z), rtol=0, atol=TOL)


def test_old_attention_key_names_load_the_same(tmp_path):
  """diffusers before 0.14 saved the mid-block attention as query/key/value/proj_attn."""
  from safetensors.numpy import load_file, save_file
  directory = save(diffusers_vae(**CONFIGS['layers2']), tmp_path / 'new')
  _, new = vae.from_pretrained(directory)
  path = os.path.join(directory, vae.WEIGHTS_NAME)
  tensors = load_file(path)
  renamed = {}
  for key, value in tensors.items():
    for now, before in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                        ('to_out.0', 'proj_attn')):
      key = key.replace(f'.{now}.', f'.{before}.')
    if '.proj_attn.' in key and value.ndim == 2:   # and as 1x1 convs, as converted LDM files do
      value = value[:, :, None, None]
    renamed[key] = value
  assert any('.query.' in k for k in renamed)
  save_file(renamed, path)
  _, old = vae.from_pretrained(directory)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    np.testing.assert_array_equal(a, b)


def test_our_vae_saves_in_the_format_diffusers_loads(tmp_path):
  config = vae.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         down_block_types=(vae.DOWN_BLOCK,) * 2,
                         up_block_types=(vae.UP_BLOCK,) * 2, scaling_factor=0.7)
  from tests.test_latent_dit import random_params
  model = vae.AutoencoderKL(config)
  params = random_params(model, seed=3)   # every leaf random: a swapped tensor cannot pass
  rng = np.random.default_rng(0)
  vae.save_pretrained(str(tmp_path), config, params)
  with open(tmp_path / vae.CONFIG_NAME) as f:
    assert json.load(f)['_class_name'] == 'AutoencoderKL'

  ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
  assert ref.config.scaling_factor == 0.7
  images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))(
      params, images)
  ref_mean, ref_logvar = torch_encode(ref, images)
  np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(logvar), ref_logvar, rtol=0, atol=TOL)

  loaded_model, loaded = vae.from_pretrained(str(tmp_path))
  assert loaded_model.config == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)


def test_missing_and_unused_tensors_are_listed(tmp_path):
  from safetensors.numpy import load_file, save_file
  directory = save(diffusers_vae(**CONFIGS['groups8']), tmp_path)
  path = os.path.join(directory, vae.WEIGHTS_NAME)
  tensors = load_file(path)
  del tensors['decoder.conv_out.weight']
  tensors['decoder.extra.weight'] = np.zeros(3, np.float32)
  tensors['encoder.conv_in.bias'] = np.zeros(5, np.float32)
  save_file(tensors, path)
  with pytest.raises(ValueError) as e:
    vae.from_pretrained(directory)
  message = str(e.value)
  assert 'missing (1): decoder.conv_out.weight' in message
  assert 'unused (1): decoder.extra.weight' in message
  assert 'encoder.conv_in.bias: (5,)' in message


def test_unsupported_block_type_is_named(tmp_path):
  config = vae.VAEConfig(block_out_channels=(32, 64), down_block_types=(vae.DOWN_BLOCK,) * 2,
                         up_block_types=(vae.UP_BLOCK,) * 2).to_dict()
  config['down_block_types'][1] = 'AttnDownEncoderBlock2D'
  with pytest.raises(ValueError, match='unsupported block types .*AttnDownEncoderBlock2D'):
    vae.VAEConfig.from_dict(config)


def test_missing_weights_name_the_directory_and_the_hub_id(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  from huggingface_hub import constants
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
  with pytest.raises(FileNotFoundError) as e:
    vae.from_pretrained('stabilityai/sd-vae-ft-ema')
  message = str(e.value)
  assert str(tmp_path / 'hub') in message and 'stabilityai/sd-vae-ft-ema' in message
  assert 'hf download stabilityai/sd-vae-ft-ema' in message
  (tmp_path / 'half').mkdir()
  (tmp_path / 'half' / vae.CONFIG_NAME).write_text('{}')
  with pytest.raises(FileNotFoundError, match=f'has no {vae.WEIGHTS_NAME}'):
    vae.from_pretrained(str(tmp_path / 'half'))


def test_vae_weights_carry_logical_names():
  from layers import sharding
  config = vae.VAEConfig(block_out_channels=(16, 32), norm_num_groups=8,
                         down_block_types=(vae.DOWN_BLOCK,) * 2,
                         up_block_types=(vae.UP_BLOCK,) * 2)
  boxed = vae.abstract_params(vae.AutoencoderKL(config))
  sharding.validate_param_axes(boxed)   # raises on any weight without (valid) names


def test_posterior_sample_and_kl():
  mean = jnp.full((4096, 2), 0.5)
  logvar = jnp.full((4096, 2), np.log(0.25))
  z = vae.sample_posterior(mean, logvar, jax.random.key(0))
  assert abs(float(z.mean()) - 0.5) < 0.02 and abs(float(z.std()) - 0.5) < 0.02
  # closed form: 0.5 * (mu^2 + s^2 - 1 - log s^2) per dim
  expected = 2 * 0.5 * (0.25 + 0.25 - 1 - np.log(0.25))
  np.testing.assert_allclose(vae.kl_to_standard_normal(mean, logvar)[0], expected, rtol=1e-6)


def test_sd_vae_layout_is_diffusers_tensor_for_tensor():
  """The Stable Diffusion VAE's architecture: every tensor name and (torch) shape of diffusers'
  AutoencoderKL, and its 83,653,863 parameters."""
  kw = {k: v for k, v in vae.SD_VAE_CONFIG.to_dict().items() if not k.startswith('_')}
  ref = diffusers.AutoencoderKL(**kw)
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  boxed = vae.abstract_params(vae.AutoencoderKL(vae.SD_VAE_CONFIG))
  ours = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: hasattr(
      x, 'names')):
    shape = tuple(leaf.value.shape)
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    ours[vae.diffusers_key(tuple(p.key for p in path))] = torch_shape
  assert ours == ref_shapes
  assert sum(int(np.prod(s)) for s in ours.values()) == 83_653_863


def test_train_vae_writes_a_vae_that_diffusers_and_we_load(tmp_path):
  from tools import train_vae
  out = tmp_path / 'out'
  assert train_vae.main([f'--workdir={tmp_path / "wd"}', f'--out={out}', '--set', 'NUM_STEPS=2',
                         '--set', 'EVAL_BATCHES=1', '--set', 'CKPT_EVERY=2', '--set',
                         'BLOCK_OUT_CHANNELS=(8, 16, 16)', '--set', 'NORM_GROUPS=4',
                         '--scale_batches=1', '--eval_batches=1']) == 0
  report = json.loads((out / 'metrics.json').read_text())
  assert report['step'] == 2 and report['eval_split_examples'] == 32
  model, params = vae.from_pretrained(str(out))
  assert model.config.scaling_factor == pytest.approx(1 / report['latent_std'], rel=1e-3)
  assert (model.config.in_channels, model.config.downsample) == (1, 4)
  ref = diffusers.AutoencoderKL.from_pretrained(str(out)).eval()
  images = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1)).astype(np.float32)
  mean, _ = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))(params, images)
  np.testing.assert_allclose(np.asarray(mean), torch_encode(ref, images)[0], rtol=0, atol=TOL)
