"""A DiT on the latents of a (tiny, random) VAE: through launch.py with in-step encoding, through
pre-encoded latents, and the errors when the VAE is missing."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input import latents as latents_lib
from models import vae
from tests.test_launch import launch, ok
from trainer.summaries import read_scalars


def random_params(model, seed=0):
  """Random weights in the shapes of `model`'s params, drawn by NumPy: compiling Flax's init
  of even a tiny VAE takes XLA's CPU backend about 15 s."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    base = 1.0 if name == 'scale' else 0.0
    return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

  from flax import linen as nn
  return jax.tree_util.tree_map_with_path(draw, nn.unbox(vae.abstract_params(model)))


def tiny_vae(directory, channels):
  """A random 2-level VAE (downsampling by 2, 4 latent channels) in diffusers' format."""
  config = vae.VAEConfig(in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=(vae.DOWN_BLOCK,) * 2,
                         up_block_types=(vae.UP_BLOCK,) * 2, scaling_factor=0.5)
  vae.save_pretrained(str(directory), config, random_params(vae.AutoencoderKL(config)))
  return str(directory)


LATENT = ['--set', 'USE_VAE=True', '--set', 'VAE_DOWNSAMPLE=2', '--set', 'LATENT_CHANNELS=4']


def test_latent_dit_trains_and_samples_pixels_through_launch(tmp_path):
  path = tiny_vae(tmp_path / 'vae', 3)
  wd = str(tmp_path / 'wd')
  # 16x16x3 images -> 8x8x4 latents, patch 2: 16 tokens
  out = ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', *LATENT, '--set',
                  f'VAE_PATH={path}', '--set', 'PATCH=2', '--set', 'NUM_STEPS=4', '--set',
                  'LOG_EVERY=2', '--set', 'CKPT_EVERY=4', '--set', 'SAMPLES_PER_CLASS=1',
                  '--set', 'DENOISE_STEPS=2', devices=2))
  assert 'final eval: loss=' in out.stdout
  scalars = read_scalars(os.path.join(wd, 'tensorboard'))
  assert np.isfinite([v for _, v in scalars['learning/loss']]).all()
  assert os.path.isdir(os.path.join(wd, 'checkpoints', '4', 'state'))
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(wd, 'samples', 'step_4.png')))
  # 10 classes x 1 sample, decoded to 16x16 RGB pixels (latents would be 8x8x4), each shown 6x
  # (96 pixels), the rows labelled in a margin on the left
  assert grid.shape[0] == 10 * 97 + 1 and grid.shape[1] > 97 + 1 and grid.shape[2] == 3
  # --mode=sample decodes too
  out = str(tmp_path / 'samples.npz')
  ok(launch('--exp=DiT_T_Synthetic', f'--workdir={wd}', *LATENT, '--set', f'VAE_PATH={path}',
            '--set', 'PATCH=2', '--set', 'DENOISE_STEPS=2', '--mode=sample', '--num_samples=3',
            f'--out={out}'))
  assert np.load(out)['images'].shape == (3, 16, 16, 3)


def test_prepare_encodes_images_or_samples_stored_moments(tmp_path):
  codec = vae.PretrainedVAE(tiny_vae(tmp_path, 3), downsample=2, latent_channels=4)
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1, maxval=1)
  key = jax.random.key(2)
  prepare, encode = jax.jit(codec.prepare), jax.jit(codec.encode)
  encoded = prepare(codec.params, {'image': images, 'label': jnp.arange(4)}, key)
  mean, logvar = encode(codec.params, images)
  expected = vae.sample_posterior(mean, logvar, key) * 0.5
  np.testing.assert_allclose(encoded['image'], expected, atol=1e-6)
  stored = prepare(codec.params, {'moments': jnp.concatenate([mean, logvar], -1),
                                  'label': jnp.arange(4)}, key)
  assert 'moments' not in stored
  np.testing.assert_allclose(stored['image'], expected, atol=1e-6)
  decode = jax.jit(lambda p, z: codec.model.apply({'params': p}, z, method='decode'))
  np.testing.assert_allclose(jax.jit(codec.decode)(codec.params, encoded['image']),
                             decode(codec.params, encoded['image'] / 0.5), atol=1e-6)


def test_encode_latents_then_train_on_them(tmp_path):
  from input.fashion_mnist import FashionMNIST
  from tools import encode_latents
  path = tiny_vae(tmp_path / 'vae', 1)
  out = str(tmp_path / 'latents')
  knobs = ['USE_VAE=True', f'VAE_PATH={path}', 'VAE_DOWNSAMPLE=2', 'LATENT_CHANNELS=4',
           'PATCH=2']
  args = ['--exp=DiT_T_FashionMNIST', f'--out={out}', '--limit=10', '--batch=8']
  for k in knobs:
    args += ['--set', k]
  assert encode_latents.main(args) == 0

  meta = latents_lib.read_meta(out)
  assert meta['splits']['train']['num_examples'] == 10
  assert meta['splits']['test']['num_examples'] == 10
  assert (meta['latent_size'], meta['latent_channels']) == (14, 4)
  # what was stored is the encoding of the images in order, and of their mirror images
  codec = vae.PretrainedVAE(path, downsample=2, latent_channels=4)
  images = FashionMNIST(10, 'test', train=False).batch(0)
  images['image'] = images['image'].astype(np.float32) / 127.5 - 1   # uint8 -> [-1, 1]
  source = latents_lib.LatentRecords(5, out, 'test', 14, 4, train=False)
  got = np.concatenate([source.batch(0)['moments'], source.batch(1)['moments']])
  assert source.batch(1)['label'].tolist() == images['label'][5:].tolist()
  mean, logvar = codec.encode(codec.params, images['image'])
  np.testing.assert_allclose(got, np.concatenate([mean, logvar], -1), atol=2e-3, rtol=2e-3)
  records = source.read(np.arange(10))
  mirrored = codec.encode(codec.params, images['image'][:, :, ::-1])
  np.testing.assert_allclose(np.stack([m[1] for _, m in records]).astype(np.float32),
                             np.concatenate(mirrored, -1), atol=2e-3, rtol=2e-3)
  # training takes, per row, one of the two stored copies of the example it reads, and both occur
  train = latents_lib.LatentRecords(10, out, 'train', 14, 4, train=True, seed=3)
  stored = dict(enumerate(m for _, m in train.read(np.arange(10))))
  picked = [[np.array_equal(row, stored[i][f].astype(np.float32)) for f in (0, 1)]
            for row, i in zip(train.batch(0)['moments'], train.indices(0))]
  assert all(any(p) for p in picked)
  assert {p.index(True) for p in picked} == {0, 1}

  wd = str(tmp_path / 'wd')
  sets = []
  for k in knobs + [f'LATENTS_DIR={out}', 'NUM_STEPS=3', 'GLOBAL_BATCH=4', 'EVAL_BATCHES=1',
                    'CKPT_EVERY=3', 'SAMPLES_PER_CLASS=1', 'DENOISE_STEPS=2', 'FID_NUM=0']:
    sets += ['--set', k]
  result = ok(launch('--exp=DiT_T_FashionMNIST', f'--workdir={wd}', *sets))
  assert 'final eval: loss=' in result.stdout


def test_missing_vae_fails_at_once_naming_where_it_looked(tmp_path):
  wd = tmp_path / 'wd'
  result = launch('--exp=DiT_T_FashionMNIST_Latent', f'--workdir={wd}', '--set',
                  f'VAE_PATH={tmp_path / "nothing"}')
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('launch.py: error: FileNotFoundError: no VAE directory '), lines
  assert 'python tools/train_vae.py' in lines[-1]
  assert not wd.exists()


def test_vae_that_does_not_fit_the_experiment_is_named(tmp_path):
  path = tiny_vae(tmp_path / 'vae', 1)
  with pytest.raises(ValueError, match='downsamples by 2 to 4 latent channels, but the '
                     'experiment expects VAE_DOWNSAMPLE=8'):
    vae.PretrainedVAE(path, downsample=8, latent_channels=4)
