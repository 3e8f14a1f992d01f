"""models/inception.py against pytorch-fid's own InceptionV3, with random weights (offline).

pytorch-fid downloads the FID weights in its constructor; here its load_state_dict_from_url
returns the state dict of a randomly initialised FID network instead, so the real architecture
runs with weights whose every batch-norm array is perturbed (a mis-mapped one would show).
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from layers import sharding
from models import inception

torch = pytest.importorskip('torch')
pytorch_fid_inception = pytest.importorskip('pytorch_fid.inception')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4   # max abs error of the pool3 features in float32 (measured: a few 1e-6, see below)


def random_fid_state_dict(seed=0) -> dict:
  """The state dict of pytorch-fid's FID network (built as fid_inception_v3 builds it) with random
  weights: He-normal convs, so that activations stay O(1) through the 94 convolutions, and every
  BatchNorm's weight, bias, running_mean and running_var drawn away from their defaults."""
  m = pytorch_fid_inception
  torch.manual_seed(seed)
  net = m._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  net.Mixed_5b = m.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = m.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = m.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = m.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = m.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = m.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = m.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = m.FIDInceptionE_1(1280)
  net.Mixed_7c = m.FIDInceptionE_2(2048)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
      elif isinstance(module, torch.nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(1 + 0.2 * torch.randn(c))
        module.bias.copy_(0.2 * torch.randn(c))
        module.running_mean.copy_(0.2 * torch.randn(c))
        module.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0))
  return net.state_dict()


@pytest.fixture(scope='module')
def state_dict():
  return random_fid_state_dict()


@pytest.fixture(scope='module')
def reference(state_dict):
  """pytorch-fid's InceptionV3([3]) (resize and normalize on) with the random weights."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pytorch_fid_inception, 'load_state_dict_from_url',
               lambda *args, **kwargs: state_dict)
    return pytorch_fid_inception.InceptionV3([3]).eval()


@pytest.fixture(scope='module')
def ours(state_dict, tmp_path_factory):
  """(jitted features, params) of the random weights, through the weights file; one compile per
  input shape."""
  path = str(tmp_path_factory.mktemp('fid') / 'fid_inception_v3.npz')
  inception.save(inception.params_from_torch(state_dict), path)
  net = inception.FIDInception(path)
  return jax.jit(net.features), net.params


def torch_features(model, pixels):
  """pytorch-fid's contract: NCHW in [0, 1]."""
  x = torch.from_numpy((pixels.astype(np.float32) / 255).transpose(0, 3, 1, 2))
  with torch.no_grad():
    out = model(x)[0]
  assert out.shape == (len(pixels), 2048, 1, 1)
  return out[:, :, 0, 0].numpy()


@pytest.mark.parametrize('size', [64, 320], ids=['upsample', 'downsample'])
def test_features_match_pytorch_fid(size, ours, reference):
  features, params = ours
  pixels = np.random.default_rng(size).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  got = np.asarray(features(params, pixels))
  want = torch_features(reference, pixels)
  assert got.shape == (2, 2048) and got.dtype == np.float32
  assert 0.1 < np.abs(want).mean() < 10   # O(1) features: the tolerance means something
  # measured (CPU, 8 fake devices): max abs error 2.4e-6 (64x64) and 3.3e-6 (320x320), with
  # features of mean |f| 0.47 and max |f| 6; count_include_pad=True in the FID blocks gives 0.24,
  # a zeroed first BN bias 0.19, an antialiased 512 -> 299 resize 0.49
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_uint8_and_grayscale(ours):
  features, params = ours
  # 64x64 float RGB is the upsampling test's shape: its compiled network is reused
  gray = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
  rgb = np.repeat(gray, 3, axis=-1)
  np.testing.assert_array_equal(np.asarray(features(params, gray)),
                                np.asarray(features(params, rgb.astype(np.float32))))
  # uint8 pixels read as the same float pixels
  np.testing.assert_array_equal(np.asarray(inception.preprocess(rgb)),
                                np.asarray(inception.preprocess(rgb.astype(np.float32))))
  with pytest.raises(ValueError, match='1 or 3 channels'):
    inception.preprocess(np.zeros((1, 28, 28, 4), np.uint8))


def test_convert_tool_end_to_end(state_dict, tmp_path):
  pth, out = tmp_path / 'pt_inception.pth', tmp_path / 'fid.npz'
  torch.save(state_dict, pth)
  run = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'convert_inception.py'),
                        f'--pth={pth}', f'--out={out}'], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
  assert run.returncode == 0, run.stderr
  assert '21,820,000 parameters' in run.stdout
  got = inception.FIDInception(str(out)).params
  want = inception.params_from_torch({k: v.numpy() for k, v in state_dict.items()})
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_save_load_round_trip(tmp_path):
  params = inception.FIDInception.random(seed=1).params
  inception.save(params, str(tmp_path / 'w.npz'))
  jax.tree.map(np.testing.assert_array_equal, inception.load(str(tmp_path / 'w.npz')), params)


def test_missing_weights_file_says_how_to_get_it(tmp_path):
  path = str(tmp_path / 'nowhere.npz')
  with pytest.raises(FileNotFoundError) as e:
    inception.FIDInception(path)
  message = str(e.value)
  assert path in message
  assert 'python tools/convert_inception.py --pth=' in message
  assert inception.FID_WEIGHTS_URL in message


def test_bad_state_dict_lists_every_problem(state_dict):
  bad = {k: v.numpy() for k, v in state_dict.items()}
  del bad['Mixed_6b.branch7x7_2.bn.running_var']
  bad['Mixed_7c.branch_pool.conv.weight'] = np.zeros((192, 2048, 3, 3), np.float32)
  bad['Mixed_9z.conv.weight'] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError) as e:
    inception.params_from_torch(bad)
  message = str(e.value)
  assert 'missing (1): Mixed_6b.branch7x7_2.bn.running_var' in message
  assert 'wrong shape (1): Mixed_7c.branch_pool.conv.weight' in message
  assert 'unused (1): Mixed_9z.conv.weight' in message


def test_param_axes_and_count():
  net = inception.FIDInception.random()
  sharding.validate_param_axes(net.abstract_params())
  assert net.params['Mixed_5b']['branch1x1']['conv']['kernel'].shape == (1, 1, 192, 64)
  assert net.params['Mixed_5b']['branch1x1']['bn']['mean'].shape == (64,)
  # torch's FID network: 21,785,568 parameters (convs 21,751,136 + BN affine 34,432) and 34,432
  # BN running statistics, without its unused fc (2,065,392)
  assert inception.num_params(net.params) == 21_820_000
