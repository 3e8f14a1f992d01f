"""Every model: shapes, dtype policy, finite loss and gradients, full-size parameter counts,
GPT KV-cache decoding, and sharded init on 8 fake CPU devices."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from layers import sharding
from models import dit, gpt, vit
from tests.numerics import assert_close_f32
from tasks.classification import Classification
from tasks.diffusion import FlowMatching
from tasks.language import LanguageModeling


def tiny(family, dtype=jnp.float32):
  if family == 'dit':
    model = dit.DiT(image_size=8, channels=2, patch=2, hidden=32, depth=2, heads=4,
                    num_classes=5, dtype=dtype)
    batch = {'image': jax.random.normal(jax.random.key(0), (3, 8, 8, 2)),
             'label': jnp.array([0, 4, 2])}
    inputs = (batch['image'], jnp.zeros((3,)), batch['label'])
    return model, FlowMatching(num_classes=5, denoise_timesteps=8), batch, inputs
  if family == 'vit':
    model = vit.ViT(image_size=8, channels=1, patch=4, hidden=32, depth=2, heads=4,
                    num_classes=7, dtype=dtype)
    batch = {'image': jax.random.normal(jax.random.key(0), (3, 8, 8, 1)),
             'label': jnp.array([0, 6, 2])}
    return model, Classification(num_classes=7, label_smoothing=0.1), batch, (batch['image'],)
  model = gpt.GPT(vocab_size=64, max_len=16, hidden=32, depth=2, heads=4, dtype=dtype)
  batch = {'tokens': jax.random.randint(jax.random.key(0), (3, 11), 0, 64)}
  return model, LanguageModeling(), batch, (batch['tokens'][:, :-1],)


OUT_SHAPES = {'dit': (3, 8, 8, 2), 'vit': (3, 7), 'gpt': (3, 10, 64)}


@pytest.mark.parametrize('family', ['dit', 'vit', 'gpt'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_tiny_model_shapes_loss_and_gradients(family, dtype):
  model, task, batch, inputs = tiny(family, dtype)
  params = jax.jit(lambda r: nn.unbox(model.init(r, *inputs))['params'])(jax.random.key(1))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out = jax.jit(lambda p: model.apply({'params': p}, *inputs))(params)
  assert out.shape == OUT_SHAPES[family] and out.dtype == jnp.float32
  # adaLN-Zero and zero-init heads make most gradients exactly zero at init, by design; move
  # away from init so every parameter's gradient path is live.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  grad_fn = jax.jit(jax.value_and_grad(lambda p: task.loss(model, p, batch, jax.random.key(3)),
                                       has_aux=True))
  (loss, _), grads = grad_fn(params)
  assert np.isfinite(loss)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 0, f'zero gradient for {name}'


def n_params(model, *inputs):
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('size, paper_millions', [('S', 33), ('B', 130), ('L', 458), ('XL', 675)])
def test_dit_parameter_counts_match_paper(size, paper_millions):
  hidden, depth, heads = dit.SIZES[size]
  model = dit.DiT(image_size=32, channels=4, patch=2, hidden=hidden, depth=depth, heads=heads,
                  num_classes=1000)
  n = n_params(model, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01, n


def test_vit_b16_parameter_count():
  model = vit.ViT(image_size=224, channels=3, patch=16, hidden=768, depth=12, heads=12,
                  num_classes=1000)
  n = n_params(model, jnp.zeros((1, 224, 224, 3)))
  assert abs(n / 86e6 - 1) < 0.01, n   # 86.4M: the paper's 86.6M less the learned positions


def test_vit_gap_pools_the_patch_tokens_without_a_class_token():
  """pool='gap': no class token, and the head's features are its LayerNorm of the mean of the
  backbone's patch outputs (checked in NumPy from the captured backbone output)."""
  model = vit.ViT(image_size=8, channels=1, patch=4, hidden=32, depth=2, heads=4, num_classes=7,
                  pool='gap')
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  params = nn.unbox(model.init(jax.random.key(1), x)['params'])
  assert 'cls_token' not in params and 'cls_token' in nn.unbox(
      vit.ViT(image_size=8, channels=1, patch=4, hidden=32, depth=2, heads=4,
              num_classes=7).init(jax.random.key(1), x)['params'])
  (logits, feats), state = model.apply({'params': params}, x, return_features=True,
                                       capture_intermediates=True, mutable=['intermediates'])
  h = np.asarray(state['intermediates']['backbone']['__call__'][0], np.float64)   # [3, 4, 32]
  assert h.shape == (3, 4, 32)
  m = h.mean(1)
  norm = params['head']['norm']
  want = ((m - m.mean(-1, keepdims=True)) / np.sqrt(m.var(-1, keepdims=True) + 1e-6)
          * np.asarray(norm['scale']) + np.asarray(norm['bias']))
  np.testing.assert_allclose(feats, want, atol=1e-5)
  assert logits.shape == (3, 7)
  with pytest.raises(ValueError, match="'cls', 'gap'"):
    vit.ViT(image_size=8, channels=1, patch=4, hidden=32, depth=2, heads=4, num_classes=7,
            pool='max').init(jax.random.key(1), x)


def _np_conv_same_stride2(x, w, b):
  """SAME-padded stride-2 3x3 convolution in NumPy, TensorFlow's padding rule (the extra pixel
  of an odd total padding goes after)."""
  n, hh, ww, _ = x.shape
  out_h, out_w = -(-hh // 2), -(-ww // 2)
  pad_h, pad_w = max((out_h - 1) * 2 + 3 - hh, 0), max((out_w - 1) * 2 + 3 - ww, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  y = np.zeros((n, out_h, out_w, w.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      y[:, i, j] = np.einsum('nhwc,hwcd->nd', xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
  return y + b


def test_vit_conv_stem_matches_numpy_and_keeps_the_patch_grid():
  """stem='conv': ceil(log2 p) SAME stride-2 3x3 convolutions with tanh-GELU, then a 1x1
  projection, give the tokens of the p x p patch grid (checked against NumPy), and a patch whose
  grid the stride-2 stack cannot reach is refused with both numbers."""
  from layers.embeddings import ConvStem, stem_strides
  assert [stem_strides(p) for p in (2, 4, 7, 8, 16)] == [1, 2, 3, 3, 4]
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  stem = ConvStem(patch=4, features=32)
  params = nn.unbox(stem.init(jax.random.key(1), x)['params'])
  assert [params[f'conv{i}']['kernel'].shape for i in range(2)] == [(3, 3, 3, 8), (3, 3, 8, 16)]
  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  h = np.asarray(x, np.float64)
  for i in range(2):
    h = gelu(_np_conv_same_stride2(h, np.asarray(params[f'conv{i}']['kernel'], np.float64),
                                   np.asarray(params[f'conv{i}']['bias'], np.float64)))
  want = h.reshape(2, 4, 16) @ np.asarray(params['proj']['kernel']) + np.asarray(
      params['proj']['bias'])
  assert_close_f32(stem.apply({'params': params}, x), want, err_msg='conv stem')

  model = vit.ViT(image_size=28, channels=1, patch=7, hidden=32, depth=1, heads=4,
                  num_classes=10, stem='conv')
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  assert 'conv_embed' in shapes and 'patch_embed' not in shapes
  assert shapes['conv_embed']['conv2']['kernel'].names == ('kernel_h', 'kernel_w', 'conv_in',
                                                             'conv_out')
  with pytest.raises(ValueError, match='56x56 pixels into 49 tokens, not the 64 of patch 7'):
    model.clone(image_size=56).init(jax.random.key(0), jnp.zeros((1, 56, 56, 1)))
  with pytest.raises(ValueError, match="'patch', 'conv'"):
    model.clone(stem='hybrid').init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def test_dit_decoder_conv_starts_at_zero_learns_and_reaches_across_patch_borders():
  """decoder_conv=k: the patch decoder writes k channels a pixel and a zero-initialised 3x3
  convolution maps them to the output (checked against NumPy once trained weights are in), so
  the output starts at zero as the plain decoder's does, yet its gradient is not zero, and a
  pixel on a patch border moves with the neighbouring patch's token, which the plain decoder's
  never does."""
  from layers.embeddings import unpatchify
  from layers.heads import FinalAdaLN
  p, k, size = 4, 8, 8                            # a 2 x 2 grid of 4-pixel patches
  h = jax.random.normal(jax.random.key(0), (1, 4, 16))
  cond = jax.random.normal(jax.random.key(1), (1, 16))
  head = FinalAdaLN(p, 1, size, size, conv_features=k)
  params = nn.unbox(head.init(jax.random.key(2), h, cond)['params'])
  assert params['conv']['kernel'].shape == (3, 3, k, 1) and params['proj']['kernel'].shape == (
      16, p * p * k)
  assert float(jnp.abs(head.apply({'params': params}, h, cond)).max()) == 0
  grad = jax.grad(lambda q: head.apply({'params': q}, h, cond).sum())(params)
  assert float(jnp.abs(grad['conv']['kernel']).max()) > 0
  # with a trained (here random) kernel: the output is the 3x3 SAME convolution of the
  # unpatchified k-channel decoding
  params['conv']['kernel'] = jax.random.normal(jax.random.key(3), (3, 3, k, 1))
  out, seen = head.apply({'params': params}, h, cond,
                         capture_intermediates=lambda mdl, _: mdl.name == 'proj')
  out = np.asarray(out, np.float64)
  decoded = seen['intermediates']['proj']['__call__'][0]          # [1, 4 tokens, p * p * k]
  feats = np.asarray(unpatchify(decoded, p, size, size), np.float64)
  padded = np.pad(feats, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kern = np.asarray(params['conv']['kernel'], np.float64)
  want = sum(padded[:, i:i + size, j:j + size] @ kern[i, j] for i in range(3) for j in range(3))
  assert_close_f32(out, want + np.asarray(params['conv']['bias']), err_msg='decoder conv')
  # token 1 (top-right patch) moves pixel (0, 3), the last column of token 0's patch
  moved = h.at[0, 1].add(jax.random.normal(jax.random.key(5), (16,)))   # not a constant: the
  # norm would take a constant shift out
  delta = np.abs(np.asarray(head.apply({'params': params}, moved, cond)) - out)[0, :, :, 0]
  assert delta[0, 3] > 1e-3 and delta[0, 2] == 0
  plain = FinalAdaLN(p, 1, size, size)
  plain_params = nn.unbox(plain.init(jax.random.key(2), h, cond)['params'])
  plain_params['proj']['kernel'] = jax.random.normal(jax.random.key(4), (16, p * p))
  delta = np.abs(np.asarray(plain.apply({'params': plain_params}, moved, cond))
                 - np.asarray(plain.apply({'params': plain_params}, h, cond)))[0, :, :, 0]
  assert delta[:, :4].max() == 0 and delta[:4, 4:].max() > 0


def test_dit_overlapping_decoder_adds_centred_blocks_as_numpy_does():
  """decoder_overlap: each token's 2p x 2p block is centred on its p x p patch and summed with
  its neighbours' (written out here pixel by pixel), so a pixel next to a patch border moves with
  both tokens; the head starts at zero as the plain one does; an odd patch is refused."""
  from layers.embeddings import unpatchify_overlapping
  from layers.heads import FinalAdaLN
  p, gh, gw, c = 4, 2, 3, 2
  blocks = np.random.default_rng(0).normal(size=(2, gh * gw, 4 * p * p * c))
  got = np.asarray(unpatchify_overlapping(jnp.asarray(blocks, jnp.float32), p, gh * p, gw * p))
  canvas = np.zeros((2, (gh + 1) * p, (gw + 1) * p, c))
  b = blocks.reshape(2, gh, gw, 2 * p, 2 * p, c)
  for i in range(gh):
    for j in range(gw):
      for u in range(2 * p):
        for v in range(2 * p):
          canvas[:, i * p + u, j * p + v] += b[:, i, j, u, v]
  want = canvas[:, p // 2:p // 2 + gh * p, p // 2:p // 2 + gw * p]
  assert_close_f32(got, want, err_msg='overlap-add')
  with pytest.raises(ValueError, match='even patch size, got 3'):
    unpatchify_overlapping(jnp.zeros((1, 4, 36)), 3, 6, 6)

  h = jax.random.normal(jax.random.key(0), (1, 4, 16))
  cond = jax.random.normal(jax.random.key(1), (1, 16))
  head = FinalAdaLN(p, 1, 8, 8, overlap=True)
  params = nn.unbox(head.init(jax.random.key(2), h, cond)['params'])
  assert params['proj']['kernel'].shape == (16, 4 * p * p)
  assert float(jnp.abs(head.apply({'params': params}, h, cond)).max()) == 0
  params['proj']['kernel'] = jax.random.normal(jax.random.key(3), (16, 4 * p * p))
  out = np.asarray(head.apply({'params': params}, h, cond))
  moved = h.at[0, 1].add(jax.random.normal(jax.random.key(5), (16,)))    # the top-right token
  delta = np.abs(np.asarray(head.apply({'params': params}, moved, cond)) - out)[0, :, :, 0]
  # it reaches 2 columns into the top-left patch (columns 2-3), not further, and not row 6
  assert delta[:6, 2:].min() > 0 and delta[:, :2].max() == 0 and delta[6:].max() == 0
  with pytest.raises(ValueError, match='choose one decoder'):
    FinalAdaLN(p, 1, 8, 8, overlap=True, conv_features=4).init(jax.random.key(2), h, cond)


def perturbed_dit(model, x, t, y, skip=()):
  """The DiT's parameters with every weight outside the top-level modules in `skip` moved by
  normal(0.3) noise: its zero-initialised heads would otherwise hide everything."""
  params = nn.unbox(model.init(jax.random.key(1), x, t, y))['params']
  leaves, tree = jax.tree.flatten({k: v for k, v in params.items() if k not in skip})
  keys = jax.random.split(jax.random.key(2), len(leaves))
  moved = tree.unflatten([w + 0.3 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])
  return {**params, **moved}


def test_dit_grid_shift_moves_the_grid_not_the_image():
  """shift [b, 2]: the image sits that many pixels into a zero canvas one patch larger, the
  tokens' positions are their patches' in image coordinates, and the output is cropped back."""
  p = 4
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t, y = jnp.array([0.3, 0.8]), jnp.array([1, 4])

  model = dit.DiT(image_size=8, channels=1, patch=p, hidden=32, depth=2, heads=4, num_classes=5,
                  embed_margin=2, decoder_overlap=True)
  params = perturbed_dit(model, x, t, y)
  run = lambda x, t, y, **kw: model.apply({'params': params}, x, t, y, **kw)
  # no shift: the plain model on the image padded by a patch below and right, cropped
  zero = run(x, t, y, shift=jnp.zeros((2, 2), jnp.int32))
  padded = jnp.pad(x, ((0, 0), (0, p), (0, p), (0, 0)))
  assert_close_f32(zero, run(padded, t, y)[:, :8, :8], err_msg='shift 0 vs padded image')
  s = jnp.array([[1, 3], [2, 0]], jnp.int32)
  both = run(x, t, y, shift=s)
  assert both.shape == x.shape
  for k in range(2):                    # each image's grid is its own
    alone = run(x[k:k + 1], t[k:k + 1], y[k:k + 1], shift=s[k:k + 1])
    assert_close_f32(both[k:k + 1], alone, err_msg=f'image {k} alone')
  assert float(jnp.abs(both - zero).mean()) > 1e-3   # and the grid's phase matters
  with pytest.raises(ValueError, match=r'shift has shape \(2,\).*\[2, 2\]'):
    run(x, t, y, shift=jnp.zeros((2,), jnp.int32))

  # positions follow the image: with the blocks left at their adaLN-Zero identity and a plain
  # patch decoder, each token is decoded from its own patch and position alone, so moving image
  # and grid together by a whole patch (shift p, one past the range the task draws) changes no
  # output pixel, while a shift within a patch does
  local = dit.DiT(image_size=8, channels=1, patch=p, hidden=32, depth=2, heads=4, num_classes=5)
  params_local = perturbed_dit(local, x, t, y, skip=('backbone',))
  out = [local.apply({'params': params_local}, x, t, y, shift=jnp.array(s_, jnp.int32))
         for s_ in ([[0, 0], [0, 0]], [[p, p], [p, 0]], [[1, 3], [2, 2]])]
  np.testing.assert_array_equal(out[0], out[1])
  assert float(jnp.abs(out[0] - out[2]).mean()) > 1e-3


def test_dit_rolled_grid_is_the_padded_one_with_its_edge_tokens_merged():
  """shift_mode='roll': the image is rolled by the shift instead of placed on a larger canvas,
  so the token count stays (H/p)(W/p). Token i then covers the image rows and columns that the
  padded canvas's token i covers, at the same position, and only the wrapped tokens differ:
  those hold the pixels past the far edge where the canvas had zeros. With the blocks at their
  adaLN-Zero identity and a plain decoder (each pixel decoded from its own token), roll and pad
  agree on every pixel outside the wrapped rows and columns, and a change to the last image row
  reaches the first rows under roll only. The whole model (margins and overlapping blocks
  wrapping, attention) keeps each image's grid its own."""
  p, n = 4, 12
  x = jax.random.normal(jax.random.key(0), (2, n, n, 1))
  t, y = jnp.array([0.3, 0.8]), jnp.array([1, 4])
  s = jnp.array([[1, 3], [2, 0]], jnp.int32)

  kw = dict(image_size=n, channels=1, patch=p, hidden=32, depth=2, heads=4, num_classes=5)
  pad, roll = dit.DiT(**kw), dit.DiT(**kw, shift_mode='roll')
  params = perturbed_dit(pad, x, t, y, skip=('backbone',))     # the same parameters fit both
  run = lambda model, x: np.asarray(model.apply({'params': params}, x, t, y, shift=s))
  rolled, padded = run(roll, x), run(pad, x)
  assert rolled.shape == x.shape
  for k, (sr, sc) in enumerate(np.asarray(s)):    # rows and columns that no wrapped token holds
    inner = (slice(p - sr, n - sr), slice(p - sc, n - sc))
    assert_close_f32(rolled[k][inner], padded[k][inner], err_msg=f'image {k} away from the wrap')
    assert np.abs(rolled[k] - padded[k]).max() > 1e-3
  last_row = x.at[:, n - 1].add(1.0)
  moved_roll, moved_pad = run(roll, last_row), run(pad, last_row)
  # image 0 wraps 1 row: its first p - 1 rows share a token with the last row under roll
  assert np.abs(moved_roll[0, :p - 1] - rolled[0, :p - 1]).min() > 0
  np.testing.assert_array_equal(moved_pad[0, :p - 1], padded[0, :p - 1])

  full = dit.DiT(**kw, embed_margin=2, decoder_overlap=True, shift_mode='roll')
  params_full = perturbed_dit(full, x, t, y)
  both = full.apply({'params': params_full}, x, t, y, shift=s)
  for k in range(2):
    alone = full.apply({'params': params_full}, x[k:k + 1], t[k:k + 1], y[k:k + 1],
                       shift=s[k:k + 1])
    assert_close_f32(both[k:k + 1], alone, err_msg=f'image {k} alone')
  unshifted = full.apply({'params': params_full}, x, t, y, shift=jnp.zeros_like(s))
  assert float(jnp.abs(both - unshifted).mean()) > 1e-3
  with pytest.raises(ValueError, match="shift_mode 'torus': one of"):
    dit.DiT(**kw, shift_mode='torus').init(jax.random.key(1), x, t, y)


def test_wrapped_windows_and_blocks_reach_around_the_image():
  """wrap=True: a window at the border takes the opposite side's pixels instead of zeros
  (cut out pixel by pixel from NumPy's wrap padding), an overlapping block at the border adds
  its overhang to the opposite side (indices taken modulo the image size), and the two are
  each other's adjoint at margin p/2, as the zero-padded pair is. The decoder's 3x3
  convolution wraps too: the bottom-right token reaches the top-left pixel."""
  from layers.embeddings import patchify_overlapping, unpatchify_overlapping
  rng = np.random.default_rng(0)
  p, gh, gw, c, m = 4, 2, 3, 2, 3
  hh, ww, w = gh * p, gw * p, p + 2 * m
  x = rng.normal(size=(2, hh, ww, c)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode='wrap')
  want = np.zeros((2, gh * gw, w, w, c), np.float32)
  for i in range(gh):
    for j in range(gw):
      want[:, i * gw + j] = padded[:, i * p:i * p + w, j * p:j * p + w]
  np.testing.assert_array_equal(patchify_overlapping(jnp.asarray(x), p, m, wrap=True),
                                want.reshape(2, gh * gw, -1))

  blocks = rng.normal(size=(2, gh * gw, 4 * p * p * c))
  canvas = np.zeros((2, hh, ww, c))
  b = blocks.reshape(2, gh, gw, 2 * p, 2 * p, c)
  for i in range(gh):
    for j in range(gw):
      for u in range(2 * p):
        for v in range(2 * p):
          canvas[:, (i * p + u - p // 2) % hh, (j * p + v - p // 2) % ww] += b[:, i, j, u, v]
  got = unpatchify_overlapping(jnp.asarray(blocks, jnp.float32), p, hh, ww, wrap=True)
  assert_close_f32(got, canvas, err_msg='wrapped overlap-add')
  # <patchify(x), blocks> == <x, unpatchify(blocks)>
  lhs = np.vdot(np.asarray(patchify_overlapping(jnp.asarray(x), p, p // 2, wrap=True)), blocks)
  rhs = np.vdot(x, np.asarray(got))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)

  from layers.heads import FinalAdaLN
  h = jax.random.normal(jax.random.key(0), (1, gh * gw, 16))
  cond = jax.random.normal(jax.random.key(1), (1, 16))
  moved = h.at[0, -1].add(1.0)                                  # the bottom-right token
  for wrap in (False, True):
    head = FinalAdaLN(p, 1, hh, ww, conv_features=4, wrap=wrap)
    params = nn.unbox(head.init(jax.random.key(2), h, cond)['params'])
    params['conv']['kernel'] = jax.random.normal(jax.random.key(3), params['conv']['kernel'].shape)
    out = lambda h: np.asarray(head.apply({'params': params}, h, cond))[0, :, :, 0]
    delta = np.abs(out(moved) - out(h))
    assert (delta[0, 0] > 0) == wrap, f'wrap={wrap}: top-left pixel moved by {delta[0, 0]}'
    assert delta[1:p - 1, 1:ww - p - 1].max() == 0       # nor more than a pixel beyond it


@pytest.mark.parametrize('p, margin', [(4, 2), (4, 4), (3, 1)])
def test_dit_patch_embed_margin_is_a_centred_strided_convolution(p, margin):
  """embed_margin m: each token embeds the (p + 2m) x (p + 2m) window centred on its p x p patch,
  zeros beyond the image (the windows cut out pixel by pixel here), so the embedding is a
  convolution of stride p and padding m (against XLA's convolution); a pixel next to a patch
  border moves both tokens, which the plain embedding's never does."""
  from jax import lax
  from layers.embeddings import PatchEmbed, patchify_overlapping
  gh, gw, c, w = 2, 3, 2, p + 2 * margin
  x = np.random.default_rng(0).normal(size=(2, gh * p, gw * p, c)).astype(np.float32)
  got = np.asarray(patchify_overlapping(jnp.asarray(x), p, margin))
  padded = np.pad(x, ((0, 0), (margin, margin), (margin, margin), (0, 0)))
  want = np.zeros((2, gh * gw, w, w, c), np.float32)
  for i in range(gh):
    for j in range(gw):
      for u in range(w):
        for v in range(w):
          want[:, i * gw + j, u, v] = padded[:, i * p + u, j * p + v]
  np.testing.assert_array_equal(got, want.reshape(2, gh * gw, -1))

  embed = PatchEmbed(p, 5, margin=margin)
  params = nn.unbox(embed.init(jax.random.key(0), jnp.asarray(x))['params'])
  kernel = params['proj']['kernel']
  assert kernel.shape == (w * w * c, 5)
  conv = lax.conv_general_dilated(jnp.asarray(x), kernel.reshape(w, w, c, 5), (p, p),
                                  [(margin, margin)] * 2, precision='highest',
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  out = np.asarray(embed.apply({'params': params}, jnp.asarray(x)))
  assert_close_f32(out, np.asarray(conv).reshape(2, gh * gw, 5) + np.asarray(
      params['proj']['bias']), err_msg='patch embedding with a margin vs convolution')
  moved = x.copy()
  moved[:, 1, p - 1] += 1.0             # the last column of token 0's patch, row 1
  delta = np.abs(np.asarray(embed.apply({'params': params}, jnp.asarray(moved))) - out).max(-1)
  # exactly the tokens whose window holds pixel (1, p - 1) move: at these margins token 0 and
  # its right neighbour, and the row below once the margin reaches row 1 from there
  sees = [i * p - margin <= 1 < (i + 1) * p + margin and j * p - margin <= p - 1 < (j + 1) * p
          + margin for i in range(gh) for j in range(gw)]
  assert sees[:2] == [True, True] and sees[3] == (margin >= p - 1)
  np.testing.assert_array_equal(delta.min(0) > 0, sees)
  np.testing.assert_array_equal(delta.max(0) > 0, sees)
  plain = PatchEmbed(p, 5)
  plain_params = nn.unbox(plain.init(jax.random.key(0), jnp.asarray(x))['params'])
  delta = np.abs(np.asarray(plain.apply({'params': plain_params}, jnp.asarray(moved)))
                 - np.asarray(plain.apply({'params': plain_params}, jnp.asarray(x)))).max(-1)
  assert delta[:, 0].min() > 0 and delta[:, 1:].max() == 0
  if margin * 2 == p:  # windows twice the patch read what the overlapping decoder writes
    from layers.embeddings import unpatchify_overlapping
    y = np.random.default_rng(1).normal(size=got.shape).astype(np.float32)
    np.testing.assert_allclose(np.vdot(unpatchify_overlapping(jnp.asarray(y), p, gh * p, gw * p),
                                       x), np.vdot(y, got), rtol=1e-5)


def test_gpt2_small_parameter_count():
  model = gpt.GPT(vocab_size=50257, max_len=1024, hidden=768, depth=12, heads=12,
                  vocab_multiple=1)
  assert n_params(model, jnp.zeros((1, 1024), jnp.int32)) == 124_439_808  # GPT-2 124M, tied
  padded = model.clone(vocab_multiple=128)                   # 50257 -> 50304 table rows
  assert padded.padded_vocab == 50304
  assert n_params(padded, jnp.zeros((1, 1024), jnp.int32)) == 124_439_808 + 47 * 768


def test_gpt_loss_chunk_by_default_follows_the_device_memory():
  """LOSS_CHUNK=None: all logits at once while a device's share of the float32 logits takes at
  most 1/8 of its memory (GPT-B's 32 x 1024 tokens on one H200), else 128 positions at a time
  (GPT_S_OWT's 480 sequences on one H200, GPT-B on a 40 GB A100); the batch's sharding divides
  the share; a device that reports no memory (this CPU) chunks; a set LOSS_CHUNK stays."""
  model = gpt.GPT(vocab_size=50257, max_len=1024, hidden=768, depth=12, heads=12,
                  loss_chunk=None)
  h200, a100 = 141 * 2**30, 40 * 2**30
  share = lambda b, memory: b * 1024 * 50304 * 4 / memory
  assert share(32, h200) < gpt.LOGITS_MEMORY_FRACTION == 1 / 8 < share(32, a100)
  assert model.chunk_for(32, 1024, h200) == 0
  assert model.chunk_for(480, 1024, h200) == gpt.AUTO_LOSS_CHUNK == 128
  assert model.chunk_for(32, 1024, a100) == 128
  assert model.chunk_for(32, 1024) == 128                     # this CPU reports no memory
  assert model.clone(loss_chunk=64).chunk_for(32, 1024, h200) == 64
  assert model.clone(loss_chunk=0).chunk_for(480, 1024, h200) == 0
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 4})           # the batch over 8 devices
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert model.chunk_for(256, 1024, h200) == 0               # 32 sequences a device
    assert model.chunk_for(1024, 1024, h200) == 128            # 128 a device
  from experiments import base
  exp, cfg = base.build_config('GPT_S_OWT', [])
  assert exp.LOSS_CHUNK is None and cfg.model.loss_chunk is None


@pytest.mark.parametrize('tie', [True, False])
def test_gpt_padded_vocab_and_chunked_loss_match_plain(tie):
  """Padding ids are never predicted (their logits are -inf), the returned logits cover the real
  vocabulary only, and the chunked and the vocabulary-streamed losses (and their gradients)
  equal the loss of the full logits computed here with float32 log-softmax."""
  model = gpt.GPT(vocab_size=100, max_len=12, hidden=32, depth=1, heads=4, vocab_multiple=64,
                  tie_embeddings=tie)
  tokens = jax.random.randint(jax.random.key(0), (3, 13), 0, 100)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = nn.unbox(model.init(jax.random.key(1), inputs))['params']
  params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(2), p.shape), params)
  table = params['token_embed']['embedding'] if tie else params['head']
  assert table.shape == (128, 32)
  logits = model.apply({'params': params}, inputs)
  assert logits.shape == (3, 12, 100)

  def reference(p):
    logp = jax.nn.log_softmax(model.apply({'params': p}, inputs), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].mean()

  def chunked(p, chunk, block):
    nll, correct = model.clone(loss_chunk=chunk, loss_vocab_block=block).apply(
        {'params': p}, inputs, targets)
    return nll.mean(), correct

  ref, ref_grads = jax.value_and_grad(reference)(params)
  # 5 does not divide 12: the last chunk is padded; 48 takes blocks of 32 rows (the largest
  # divisor of the 128 table rows in (24, 48]); 64 splits the rows into the real ids and the
  # padding; 500 is one block of all 128 rows
  for chunk, block in ((0, 0), (5, 0), (12, 0), (0, 48), (5, 48), (0, 64), (12, 500)):
    (loss, correct), grads = jax.value_and_grad(chunked, has_aux=True)(params, chunk, block)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_array_equal(correct, logits.argmax(-1) == targets)   # no ties here
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  # the padding rows get no gradient through the output softmax (their probability is 0)
  pad_rows = (grads['token_embed']['embedding'] if tie else grads['head'])[100:]
  np.testing.assert_array_equal(pad_rows, 0)


def test_vocab_streamed_loss_with_an_overlapping_last_block():
  """97 table rows (prime) have no divisor near 40: blocks of 40 rows start at 0, 40 and 57, the
  last masking rows 57-79, which the block before took; ids 90-96 are padding. Loss, hits and
  both gradients equal the plain loss's."""
  from layers.heads import block_rows, token_cross_entropy, vocab_blocked_cross_entropy
  assert [block_rows(97, 40), block_rows(128, 48), block_rows(100, 500)] == [40, 32, 100]
  assert block_rows(50304, 2048) == 1572                     # GPT-2's padded vocabulary: 32
  model = gpt.GPT(vocab_size=100, max_len=8, hidden=8, depth=1, heads=1)
  assert jax.default_backend() == 'cpu' and model.streamed_vocab_block == 2048   # the default
  assert model.clone(loss_vocab_block=0).streamed_vocab_block == 0
  h = jax.random.normal(jax.random.key(0), (6, 8))
  table = jax.random.normal(jax.random.key(1), (97, 8))
  targets = jnp.array([0, 39, 40, 57, 79, 89])                # each block's edges
  targets_neg = targets - 97                                  # counted from the end

  def loss(fn, h, table, targets):
    nll, correct = fn(h, table, targets)
    return jnp.sum(nll * jnp.arange(1.0, 7.0)), (nll, correct)

  plain = lambda h, t, y: [x[0] for x in token_cross_entropy(h[None], t, y[None], 90)]
  blocked = lambda h, t, y: vocab_blocked_cross_entropy(h, t, y, 90, 40)
  (_, (nll, hit)), grads = jax.value_and_grad(
      lambda h, t: loss(plain, h, t, targets), argnums=(0, 1), has_aux=True)(h, table)
  for y in (targets, targets_neg):
    (_, (nll_b, hit_b)), grads_b = jax.value_and_grad(
        lambda h, t: loss(blocked, h, t, y), argnums=(0, 1), has_aux=True)(h, table)
    np.testing.assert_allclose(nll_b, nll, rtol=1e-6)
    np.testing.assert_array_equal(hit_b, hit)
    for g, r in zip(grads_b, grads):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grads[1][90:], 0)             # padding rows: probability 0


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_vocab_streamed_loss_sharded_and_16bit(dtype):
  """The vocabulary-streamed loss under an FSDP mesh of 8 devices (the table's rows sliced while
  its columns are sharded) equals the plain loss on one, in float32 and in bfloat16 (there
  within the rounding of the 16-bit cotangent both paths feed their matmuls)."""
  model = gpt.GPT(vocab_size=200, max_len=16, hidden=32, depth=1, heads=4, dtype=dtype)
  tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 200)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  params = jax.jit(lambda r: nn.unbox(model.init(r, inputs))['params'])(jax.random.key(1))

  def loss(p, block):
    nll, _ = model.clone(loss_vocab_block=block).apply({'params': p}, inputs, targets)
    return nll.mean()

  ref, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  mesh = sharding.make_mesh({'fsdp': 8})
  sharded, _ = sharding.sharded_init(
      lambda rng: model.init(rng, inputs)['params'], mesh, jax.random.key(1))
  table = sharded['token_embed']['embedding']                                # [256, 32]
  assert table.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    got, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(sharded, 96)
  # bfloat16: both paths round the logits' cotangent to 8 bits of mantissa, at other points
  rel = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(got, ref, rtol=rel)
  # the floor: the key bias's gradient is zero but for rounding (softmax ignores a shift)
  floor = rel * 1e-3 * max(np.abs(r).max() for r in jax.tree.leaves(ref_grads))
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=rel, atol=max(rel * np.abs(r).max(), floor))


@pytest.mark.parametrize('fused_qkv', [False, True])   # fused: prefill stacks, steps do not
def test_gpt_kv_cache_matches_full_forward(fused_qkv):
  model = gpt.GPT(vocab_size=64, max_len=32, hidden=32, depth=2, heads=4, fused_qkv=fused_qkv)
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 64)
  params = jax.jit(lambda r: nn.unbox(model.init(r, tokens))['params'])(jax.random.key(1))
  full = jax.jit(lambda p: model.apply({'params': p}, tokens))(params)                          # [2, 24, 64]

  decoder = model.clone(decode=True)
  cache = decoder.init(jax.random.key(2), jnp.zeros((2, 24), jnp.int32))['cache']
  prompt = 8
  logits, upd = decoder.apply({'params': params, 'cache': cache}, tokens[:, :prompt],
                              mutable=['cache'])
  np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-4)
  cache = upd['cache']
  step = jax.jit(lambda c, t: decoder.apply({'params': params, 'cache': c}, t, mutable=['cache']))
  for pos in range(prompt, prompt + 16):
    logits, upd = step(cache, tokens[:, pos:pos + 1])
    cache = upd['cache']
    np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=1e-4)


@pytest.mark.parametrize('family', ['dit', 'vit', 'gpt'])
def test_sharded_init_puts_large_kernels_on_fsdp(family):
  model, _, _, inputs = tiny(family)
  mesh = sharding.make_mesh({'fsdp': 8})
  params, shardings = sharding.sharded_init(
      lambda rng: model.init(rng, *inputs)['params'], mesh, jax.random.key(0))
  mlp_in = params['backbone']['block0']['mlp']['wi']['kernel']              # [d, f]
  assert mlp_in.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert mlp_in.addressable_shards[0].data.shape == (32 // 8, 128)
  qkv = params['backbone']['block1']['attn']['query']['kernel']             # [d, n, h]
  assert qkv.sharding.spec[0] == 'fsdp'
  out = params['backbone']['block1']['attn']['out']['kernel']               # [n, h, d]
  assert out.sharding.spec[2] == 'fsdp'
  # same numbers as an unsharded init
  plain = jax.jit(lambda r: nn.unbox(model.init(r, *inputs))['params'])(jax.random.key(0))
  np.testing.assert_array_equal(mlp_in, plain['backbone']['block0']['mlp']['wi']['kernel'])


@pytest.mark.parametrize('family', ['dit', 'vit', 'gpt'])
def test_full_size_partition_specs_validate(family):
  if family == 'dit':
    hidden, depth, heads = dit.SIZES['XL']
    model = dit.DiT(image_size=32, channels=4, patch=2, hidden=hidden, depth=depth, heads=heads,
                    num_classes=1000)
    inputs = (jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  elif family == 'vit':
    model = vit.ViT(image_size=224, channels=3, patch=16, hidden=768, depth=12, heads=12,
                    num_classes=1000)
    inputs = (jnp.zeros((1, 224, 224, 3)),)
  else:
    model = gpt.GPT(vocab_size=50257, max_len=1024, hidden=1152, depth=28, heads=16)
    inputs = (jnp.zeros((1, 1024), jnp.int32),)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)['params']
  sharding.validate_param_axes(boxed)
  shardings = sharding.param_shardings(boxed, sharding.make_mesh({'fsdp': 8}))
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert sum('fsdp' in tuple(s) for s in specs) > len(specs) // 3


def test_flops_formulas_count_matmuls():
  # GPT: 24 l d^2 + 4 l^2 d per layer plus the vocabulary projection (with f = 4d)
  l, d, depth, v = 1024, 768, 12, 50257
  want = depth * (24 * l * d * d + 4 * l * l * d) + 2 * l * d * v
  assert gpt.flops_per_example(seq_len=l, hidden=d, depth=depth, vocab_size=v) == want
  # cross-check the formula against XLA's own count for a tiny model (matmuls dominate)
  model, _, _, inputs = tiny('vit')
  params = nn.unbox(model.init(jax.random.key(0), *inputs))['params']
  compiled = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(params, *inputs).compile()
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  ours = 3 * vit.flops_per_example(image_size=8, channels=1, patch=4, hidden=32, depth=2,
                                   num_classes=7)
  assert 0.8 < ours / xla['flops'] <= 1.0 + 1e-6


@pytest.mark.parametrize('size, paper_gflops', [('S', 6.06), ('B', 23.01), ('L', 80.71),
                                                ('XL', 118.64)])
def test_dit_flops_match_paper(size, paper_gflops):
  # The DiT paper's Gflops (Table 4, 256x256 -> 32x32x4 latents, patch 2) count multiply-adds.
  hidden, depth, _ = dit.SIZES[size]
  macs = dit.flops_per_example(image_size=32, channels=4, patch=2, hidden=hidden, depth=depth) / 2
  assert abs(macs / 1e9 / paper_gflops - 1) < 0.005


def test_token_cross_entropy_counts_a_tie_for_the_top_as_a_hit():
  # rows 1 and 3 of the table are equal, so both ids get the top logit: each counts as a hit
  # (argmax would credit only id 1); id 2's logit is below the top
  from layers.heads import label_logit, token_cross_entropy
  table = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
  h = jnp.array([[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])
  targets = jnp.array([[1, 3, 0, 2]])
  nll, correct = token_cross_entropy(h, table, targets, vocab_size=4)
  np.testing.assert_array_equal(correct, [[True, True, True, False]])
  logits = jnp.einsum('bld,vd->blv', h, table)
  logp = jax.nn.log_softmax(logits, -1)
  np.testing.assert_allclose(nll, -logp[0, jnp.arange(4), targets[0]][None], rtol=1e-6)
  # the label logit's gradient is the gather's: g at the label, zero elsewhere
  g = jnp.array([[1.0, -2.0, 3.0, 0.5]])
  grad = jax.grad(lambda x: jnp.sum(label_logit(x, targets) * g))(logits)
  expected = jax.grad(lambda x: jnp.sum(
      jnp.take_along_axis(x, targets[..., None], -1)[..., 0] * g))(logits)
  np.testing.assert_array_equal(grad, expected)
  # negative labels count from the end in value and gradient alike, as the gather's
  neg = targets - 4
  np.testing.assert_array_equal(label_logit(logits, neg), label_logit(logits, targets))
  np.testing.assert_array_equal(
      jax.grad(lambda x: jnp.sum(label_logit(x, neg) * g))(logits), expected)
  # an infinite top logit makes the loss infinite, not NaN (as jax.nn.logsumexp)
  inf_table = table.at[2].set(jnp.array([jnp.inf, 0.0]))
  nll_inf, _ = token_cross_entropy(h[:, :1], inf_table, targets[:, :1], vocab_size=4)
  assert np.isposinf(nll_inf).all()
  # the same, streamed over blocks of the vocabulary of one row and of two
  for block in (1, 3):
    np.testing.assert_array_equal(
        token_cross_entropy(h, table, targets, 4, vocab_block=block)[1], correct)
    np.testing.assert_allclose(
        token_cross_entropy(h, table, neg, 4, vocab_block=block)[0], nll, rtol=1e-6)
    nll_inf, _ = token_cross_entropy(h[:, :1], inf_table, targets[:, :1], 4, vocab_block=block)
    assert np.isposinf(nll_inf).all()


def test_gpt_init_matches_gpt2():
  # normal(0.02) weights, the attention output and MLP output projections at 0.02 / sqrt(2 depth)
  # (Radford et al. 2019; nanoGPT), biases zero; INIT_STD=0 keeps Xavier-uniform
  depth, d = 4, 256
  model = gpt.GPT(vocab_size=512, max_len=16, hidden=d, depth=depth, heads=4, vocab_multiple=1)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))['params']
  block = params['backbone']['block0']
  scaled = 0.02 / math.sqrt(2 * depth)
  for w, std in [(block['attn']['query']['kernel'], 0.02), (block['mlp']['wi']['kernel'], 0.02),
                 (block['attn']['out']['kernel'], scaled), (block['mlp']['wo']['kernel'], scaled),
                 (params['token_embed']['embedding'], 0.02)]:
    assert abs(float(jnp.std(w)) - std) < 0.03 * std and abs(float(jnp.mean(w))) < 0.1 * std
  np.testing.assert_array_equal(block['mlp']['wo']['bias'], 0)
  xavier = nn.unbox(model.clone(init_std=0.0).init(
      jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))['params']['backbone']['block0']
  wi = xavier['mlp']['wi']['kernel']                        # uniform, var 2 / (d + 4d)
  assert abs(float(jnp.std(wi)) - math.sqrt(2 / (5 * d))) < 0.03 * math.sqrt(2 / (5 * d))
