"""Layers against independent NumPy references and closed forms."""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from layers import attentions, embeddings, sharding
from layers.normalizations import LayerNorm
from layers.transformers import Block
from tests.numerics import assert_close_f32, assert_trees_close_f32


def np_attention(q, k, v, causal):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('blnh,bsnh->bnls', q, k) / math.sqrt(q.shape[-1])
  if causal:
    l, s = logits.shape[-2:]
    logits = np.where(np.tril(np.ones((l, s), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnls,bsnh->blnh', p, v)


@pytest.mark.parametrize('impl', ['einsum', 'xla'])
@pytest.mark.parametrize('causal', [False, True])
def test_attention_matches_numpy(impl, causal):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 7, 3, 8)).astype(np.float32) for _ in range(3))
  out = attentions.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                          impl=impl)
  assert_close_f32(out, np_attention(q, k, v, causal))


@pytest.mark.parametrize('impl', ['einsum', 'xla'])
def test_causal_attention_never_looks_ahead(impl):
  layer = attentions.SelfAttention(num_heads=2, causal=True, impl=impl)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  params = layer.init(jax.random.key(1), x)
  base = layer.apply(params, x)
  for pos in range(6):
    changed = x.at[:, pos].add(5.0)
    out = layer.apply(params, changed)
    np.testing.assert_allclose(out[:, :pos], base[:, :pos], atol=1e-6)  # earlier: untouched
    assert not np.allclose(out[:, pos], base[:, pos])                    # itself: changed


def _device(platform='gpu', cc='9.0'):
  return types.SimpleNamespace(platform=platform, compute_capability=cc)


def test_auto_attention_takes_cudnn_only_where_the_fused_kernel_runs():
  q = lambda dtype=jnp.bfloat16, h=64, l=4: jnp.zeros((1, l, 2, h), dtype)
  cudnn = lambda *args, device: attentions.fused_kernel(*args, device=device) == 'cudnn'
  assert cudnn(q(), device=_device())                                   # H100 / H200
  assert cudnn(q(h=72, l=256), device=_device())                        # DiT-XL/2
  assert cudnn(q(l=197), device=_device())                 # ViT-B/16: padded to an even length
  assert cudnn(q(jnp.float16, 128), device=_device(cc='8.0'))
  refused = [
      (q(jnp.float32), None, _device()),           # cuDNN's kernel takes 16-bit inputs only
      (q(h=12), None, _device()),                  # head dim not a multiple of 8
      (q(h=256), None, _device()),                 # head dim over 128
      (q(), jnp.ones((1, 1, 4, 4), bool), _device()),   # an explicit mask (decoding's cache)
      (q(), None, _device(cc='7.5')),              # before Ampere
      (q(), None, _device(cc='gfx90a')),           # ROCm names an architecture, not a version
      (q(), None, _device(platform='cpu')),
  ]
  for args in refused:
    assert attentions.fused_kernel(args[0], args[1], device=args[2]) is None, args[1:]
  assert not cudnn(q(l=256), device=_device(platform='tpu'))   # a TPU's kernel is splash (below)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('l', [7, 8])
def test_cudnn_attention_pads_an_odd_length_behind_its_padding_mask(causal, l):
  """cudnn_attention's padding, run through XLA's implementation of the same call on this CPU:
  an odd length goes in one longer with the extra query and key masked as padding, and the
  numbers and gradients are those of the unpadded attention."""
  rng = np.random.default_rng(3)
  q, k, v, w = (rng.normal(size=(2, l, 2, 8)).astype(np.float32) for _ in range(4))
  calls = []
  plain = jax.nn.dot_product_attention
  def spy(q, k, v, **kw):
    calls.append((q.shape[1], k.shape[1], kw.get('query_seq_lengths'),
                  kw.get('key_value_seq_lengths')))
    return plain(q, k, v, **kw)
  padded = lambda q, k, v: attentions.cudnn_attention(q, k, v, causal=causal, implementation='xla')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.nn, 'dot_product_attention', spy)
    out = padded(*map(jnp.asarray, (q, k, v)))
    grads = jax.grad(lambda *a: jnp.sum(padded(*a) * w), argnums=(0, 1, 2))(q, k, v)
  even = l + l % 2
  assert calls[0][:2] == (even, even)
  for lengths in calls[0][2:]:      # both lengths given, for the batch's two sequences
    assert (lengths is None) == (l % 2 == 0)
    if l % 2:
      np.testing.assert_array_equal(lengths, [l, l])
  assert out.shape == q.shape
  assert_close_f32(out, np_attention(q, k, v, causal))
  ref = jax.grad(lambda *a: jnp.sum(attentions.attend(*a, causal=causal) * w), argnums=(0, 1, 2))
  assert_trees_close_f32(grads, ref(q, k, v))


def _refusing_cudnn(monkeypatch, where):
  """jax.nn.dot_product_attention as on a GPU whose cuDNN refuses the call, in the forward call
  or, as JAX does for some limits, only in the gradient's rule; XLA's path runs."""
  plain = jax.nn.dot_product_attention
  asked = []
  def refusing(q, k, v, *, implementation=None, **kw):
    asked.append((implementation, sorted(kw.items())))
    if implementation != 'cudnn':
      return plain(q, k, v, implementation=implementation, **kw)
    if where == 'forward':
      raise NotImplementedError('cuDNN refuses this layout')
    @jax.custom_vjp
    def kernel(q, k, v):
      return plain(q, k, v, implementation='xla', **kw)
    def kernel_fwd(q, k, v):
      raise NotImplementedError('Unsupported sequence length Q 6')
    kernel.defvjp(kernel_fwd, lambda res, g: g)
    return kernel(q, k, v)
  monkeypatch.setattr(jax.nn, 'dot_product_attention', refusing)
  monkeypatch.setattr(attentions, 'fused_kernel', lambda q, mask=None: 'cudnn')
  attentions._refusal.cache_clear()
  monkeypatch.setattr(attentions, '_refusal', attentions._refusal.__wrapped__)
  return asked


@pytest.mark.parametrize('where', ['forward', 'gradient'])
def test_auto_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch, where):
  """A refusal raised in the forward call, or only once the gradient is taken (which a try
  around the forward call would miss, under nn.scan or jax.grad of the whole model alike):
  'auto' warns and takes XLA's path, and the gradient runs."""
  asked = _refusing_cudnn(monkeypatch, where)
  rng = np.random.default_rng(1)
  q, k, v, w = (rng.normal(size=(2, 6, 2, 8)).astype(np.float32) for _ in range(4))
  auto = lambda q, k, v: jnp.sum(attentions.attend(q, k, v, causal=True, impl='auto') * w)
  refusal = 'cuDNN refuses this layout' if where == 'forward' else 'Unsupported sequence length'
  with pytest.warns(UserWarning, match=f"cudnn fused attention refused q .*{refusal}.*XLA's path"):
    value, grads = jax.value_and_grad(auto, argnums=(0, 1, 2))(q, k, v)
  scale = 1 / math.sqrt(8)
  assert asked[0] == ('cudnn', [('is_causal', True), ('scale', scale)])      # no mask to cuDNN
  assert asked[-1] == ('xla', [('is_causal', True), ('mask', None), ('scale', scale)])
  assert_close_f32(value, np.sum(np_attention(q, k, v, True) * w))
  ref = jax.grad(lambda *a: jnp.sum(attentions.attend(*a, causal=True) * w), argnums=(0, 1, 2))
  assert_trees_close_f32(grads, ref(q, k, v))


def _splash_case(causal, b=2, l=128, n=2, h=8, seed=2):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(b, l, n, h)).astype(np.float32) for _ in range(3))
  w = rng.normal(size=(b, l, n, h)).astype(np.float32)   # a loss that weighs every output
  loss = lambda impl: jax.value_and_grad(
      lambda q, k, v: jnp.sum(attentions.attend(q, k, v, causal=causal, impl=impl) * w),
      argnums=(0, 1, 2))
  return (q, k, v), loss


@pytest.mark.parametrize('causal', [False, True])
def test_splash_attention_matches_numpy_and_einsum_gradients(causal):
  """The Pallas TPU kernel, run by Pallas's interpreter on this CPU: the same numbers."""
  (q, k, v), loss = _splash_case(causal, l=256)
  out = attentions.attend(*map(jnp.asarray, (q, k, v)), causal=causal, impl='splash')
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert_close_f32(out, np_attention(q, k, v, causal))
  value, grads = jax.jit(loss('splash'))(q, k, v)
  ref_value, ref_grads = jax.jit(loss('einsum'))(q, k, v)
  assert_close_f32(value, ref_value)
  assert_trees_close_f32(grads, ref_grads)


def test_splash_attention_under_a_mesh_runs_per_device_blocks():
  """Under FSDP and tensor parallelism the kernel runs in a shard_map on each device's batch and
  heads (XLA cannot partition it): the same loss and gradients as einsum under the same mesh,
  and the output keeps q's batch and head sharding."""
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  (q, k, v), loss = _splash_case(True, b=4, n=2)
  names = ('act_batch', 'act_len', 'act_heads', None)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    spec = sharding.mesh_spec(q.shape, names)
    assert spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor', None)
    placed = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v)]
    out = jax.jit(lambda q, k, v: attentions.attend(q, k, v, causal=True, impl='splash'))(*placed)
    value, grads = jax.jit(loss('splash'))(*placed)
    ref_value, ref_grads = jax.jit(loss('einsum'))(*placed)
  assert out.sharding.spec == spec
  assert_close_f32(out, np_attention(q, k, v, True))
  assert_close_f32(value, ref_value)
  assert_trees_close_f32(grads, ref_grads)


def test_splash_attention_refuses_what_it_cannot_run():
  x = jnp.zeros((1, 200, 2, 8))
  with pytest.raises(ValueError, match='query length 200 and key length 200 must be multiples '
                                       "of 128; ATTENTION_IMPL='auto' takes XLA's path"):
    attentions.attend(x, x, x, impl='splash')
  y = jnp.zeros((1, 128, 2, 8))
  with pytest.raises(ValueError, match="'splash' takes no explicit mask"):
    attentions.attend(y, y, y, jnp.ones((1, 1, 128, 128), bool), impl='splash')


def test_auto_attention_takes_splash_on_a_tpu():
  q = lambda l=256: jnp.zeros((1, l, 2, 64), jnp.bfloat16)
  tpu = _device(platform='tpu', cc='')
  assert attentions.fused_kernel(q(), device=tpu) == 'splash'
  assert attentions.fused_kernel(q(1024).astype(jnp.float32), device=tpu) == 'splash'
  assert attentions.fused_kernel(q(197), device=tpu) is None          # ViT-B/16: XLA's path
  assert attentions.fused_kernel(q(), jnp.ones((1, 1, 256, 256), bool), device=tpu) is None
  assert attentions.fused_kernel(q(), device=_device()) == 'cudnn'
  assert attentions.fused_kernel(q(), device=_device(platform='cpu')) is None


@pytest.mark.parametrize('refuse', [False, True])
def test_auto_attention_routes_to_splash_and_falls_back_to_xla(monkeypatch, refuse):
  called = []
  plain = attentions.splash_attention
  def splash(q, k, v, *, causal=False):
    called.append(causal)
    if refuse:
      raise NotImplementedError('the kernel refuses this head dimension while tracing')
    return plain(q, k, v, causal=causal)
  monkeypatch.setattr(attentions, 'splash_attention', splash)
  monkeypatch.setattr(attentions, 'fused_kernel', lambda q, mask=None: 'splash')
  monkeypatch.setattr(attentions, '_refusal', attentions._refusal.__wrapped__)   # uncached
  (q, k, v), _ = _splash_case(True)
  run = lambda: attentions.attend(*map(jnp.asarray, (q, k, v)), causal=True, impl='auto')
  if refuse:
    with pytest.warns(UserWarning, match="the splash fused attention refused .*while tracing"):
      out = run()
  else:
    out = run()
  assert called == [True] * (1 if refuse else 2)    # the gradient's trial, then the call
  assert_close_f32(out, np_attention(q, k, v, True))


def test_fused_kernels_are_found_by_name_in_the_lowered_step():
  """What a report says ran (tools/benchmark.py's `fused_attention`): the splash kernel lowered
  for a TPU (its gradient too) is found by the names of its Mosaic calls, while another Pallas
  kernel, also a `tpu_custom_call`, is not taken for it; XLA's path holds none."""
  from jax.experimental import pallas as pl

  def add_one(x):
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + 1
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

  tpu = lambda f, *a: jax.jit(f).trace(*a).lower(lowering_platforms=('tpu',)).as_text()
  q = jnp.zeros((2, 128, 2, 64), jnp.bfloat16)
  splash = lambda q: jnp.sum(
      attentions.splash_attention(q, q, q, causal=True, interpret=False).astype(jnp.float32))
  assert attentions.fused_kernels_in(tpu(jax.grad(splash), q)) == {'splash'}
  other = tpu(add_one, jnp.zeros((8, 128)))
  assert 'tpu_custom_call' in other and attentions.fused_kernels_in(other) == set()
  xla = jax.jit(lambda q: attentions.attend(q, q, q, impl='xla')).lower(q).as_text()
  assert attentions.fused_kernels_in(xla) == set()


def test_attention_rejects_unknown_impl():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match='einsum'):
    attentions.attend(x, x, x, impl='flash')


def test_layernorm_matches_numpy():
  x = np.random.default_rng(1).normal(size=(3, 5, 12)).astype(np.float32)
  ln = LayerNorm(epsilon=1e-5)
  params = ln.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.5, nn.unbox(params))
  mean = x.astype(np.float64).mean(-1, keepdims=True)
  var = x.astype(np.float64).var(-1, keepdims=True)
  want = (x - mean) / np.sqrt(var + 1e-5) * 1.5 + 0.5
  np.testing.assert_allclose(ln.apply(params, x), want, atol=1e-5)


@pytest.mark.parametrize('modulated', [False, True])
def test_layer_norm_gradients_match_closed_form(modulated):
  # the custom VJP keeps only x and recomputes the statistics: its gradients must equal the
  # textbook LayerNorm backward for [d] parameters and for adaLN's per-example [b, 1, d]
  from layers.normalizations import layer_norm
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(3, 5, 16)) * 3 + 1).astype(np.float32)
  pshape = (3, 1, 16) if modulated else (16,)
  scale, shift = (rng.normal(size=pshape).astype(np.float32) for _ in range(2))
  g = rng.normal(size=x.shape).astype(np.float32)
  out, vjp = jax.vjp(lambda *a: layer_norm(*a, 1e-6, jnp.float32), x, scale, shift)
  dx, d_scale, d_shift = vjp(jnp.asarray(g))

  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  mean = x64.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
  y = (x64 - mean) * rstd
  gy = g64 * scale
  want_dx = rstd * (gy - gy.mean(-1, keepdims=True) - y * (gy * y).mean(-1, keepdims=True))
  axes = (1,) if modulated else (0, 1)
  np.testing.assert_allclose(out, y * scale + shift, atol=2e-5)
  np.testing.assert_allclose(dx, want_dx, atol=2e-5)
  np.testing.assert_allclose(d_scale, (g64 * y).sum(axes).reshape(pshape), atol=1e-4)
  np.testing.assert_allclose(d_shift, g64.sum(axes).reshape(pshape), atol=1e-4)


def test_layernorm_module_modulates_its_own_affine_output():
  # LayerNorm(x, shift, scale) = modulate(LayerNorm(x)) = (y gain + bias)(1 + scale) + shift,
  # with either modulation alone too
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  shift, scale = (rng.normal(size=(2, 1, 8)).astype(np.float32) for _ in range(2))
  ln = LayerNorm(epsilon=1e-5)
  params = jax.tree.map(lambda p: p + 0.5, nn.unbox(ln.init(jax.random.key(0), x)))
  plain = np.asarray(ln.apply(params, x), np.float64)
  for sh, sc, want in [(shift, scale, plain * (1 + scale) + shift), (None, scale,
                       plain * (1 + scale)), (shift, None, plain + shift)]:
    np.testing.assert_allclose(ln.apply(params, x, sh, sc), want, atol=1e-5)


def test_gelu_tanh_matches_autodiff_of_the_formula():
  from layers.mlps import gelu_tanh
  x = jnp.linspace(-8.0, 8.0, 4001)
  plain = lambda v: jax.nn.gelu(v, approximate=True)
  assert_close_f32(gelu_tanh(x), plain(x))
  assert_close_f32(jax.vmap(jax.grad(gelu_tanh))(x), jax.vmap(jax.grad(plain))(x))
  xb = x.astype(jnp.bfloat16)
  assert gelu_tanh(xb).dtype == jnp.bfloat16
  assert jax.grad(lambda v: gelu_tanh(v).astype(jnp.float32).sum())(xb).dtype == jnp.bfloat16


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_gate_branch_matches_autodiff_of_the_product(dtype):
  from layers.transformers import gate_branch
  gate = jax.random.normal(jax.random.key(0), (2, 1, 8)).astype(dtype)
  h = jax.random.normal(jax.random.key(1), (2, 5, 8)).astype(dtype)
  w = jax.random.normal(jax.random.key(2), (2, 5, 8))
  f = lambda fn: jax.value_and_grad(
      lambda g, h: jnp.sum(fn(g, h).astype(jnp.float32) * w), argnums=(0, 1))
  (v, (dg, dh)) = f(gate_branch)(gate, h)
  (v_ref, (dg_ref, dh_ref)) = f(lambda g, h: g * h)(gate, h)
  assert dg.dtype == dh.dtype == dtype and dg.shape == gate.shape
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-6, atol=1e-6)
  # float32 sums of 16-bit products, against autodiff's 16-bit ones
  g32, h32 = gate.astype(jnp.float32), h.astype(jnp.float32)
  np.testing.assert_allclose(np.float32(v), np.float32(v_ref), **tol)
  np.testing.assert_allclose(dg.astype(np.float32), (w * h32).sum(1, keepdims=True), **tol)
  np.testing.assert_allclose(dh.astype(np.float32), np.asarray(w * g32), **tol)
  np.testing.assert_allclose(dh.astype(np.float32), dh_ref.astype(np.float32), **tol)
  # accelerators (and float32) take the plain product: autodiff's own gradients, exactly
  plain = f(lambda g, h: gate_branch(g, h, cpu_kernels=False))(gate, h)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves((v_ref, (dg_ref, dh_ref)))):
    np.testing.assert_array_equal(a, b)


def test_sincos_offset_table_is_the_table_at_moved_positions():
  # per example: cell (r, c) lies at (r + dr, c + dc); offset 0 is sincos_2d itself
  dim, grid = 16, 3
  offset = np.array([[0.0, 0.0], [-0.25, -0.75], [0.5, 1.0]], np.float32)
  got = np.asarray(embeddings.sincos_2d_offset(dim, grid, jnp.asarray(offset)))
  assert got.shape == (3, grid * grid, dim)
  np.testing.assert_allclose(got[0], embeddings.sincos_2d(dim, grid), atol=1e-6)
  for k, (dr, dc) in enumerate(offset):
    for r in range(grid):
      for c in range(grid):
        want = np.concatenate([embeddings.sincos_1d(dim // 2, [c + dc])[0],
                               embeddings.sincos_1d(dim // 2, [r + dr])[0]])
        np.testing.assert_allclose(got[k, r * grid + c], want, atol=1e-6)


def test_sincos_tables_match_closed_form():
  dim, grid = 16, 4
  want1 = np.zeros((5, dim))
  for pos in range(5):
    for i in range(dim // 2):
      w = 10000.0 ** (-2.0 * i / dim)
      want1[pos, i] = math.sin(pos * w)
      want1[pos, dim // 2 + i] = math.cos(pos * w)
  np.testing.assert_allclose(embeddings.sincos_1d(dim, np.arange(5)), want1, atol=1e-6)

  table = embeddings.sincos_2d(dim, grid)
  assert table.shape == (grid * grid, dim)
  for r in range(grid):
    for c in range(grid):
      row = table[r * grid + c]
      np.testing.assert_allclose(row[:dim // 2], embeddings.sincos_1d(dim // 2, [c])[0],
                                 atol=1e-6)
      np.testing.assert_allclose(row[dim // 2:], embeddings.sincos_1d(dim // 2, [r])[0],
                                 atol=1e-6)


def test_timestep_features_closed_form():
  t = np.array([0.0, 3.0, 250.5], np.float32)
  got = np.asarray(embeddings.timestep_features(jnp.asarray(t), 8))
  freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
  want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_patchify_roundtrip_and_conv_equivalence():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  p = embeddings.patchify(x, 4)
  assert p.shape == (2, 6, 48)
  np.testing.assert_array_equal(embeddings.unpatchify(p, 4, 8, 12), x)
  # PatchEmbed is a stride-p convolution: check against lax.conv with the reshaped kernel
  layer = embeddings.PatchEmbed(patch=4, features=5)
  params = nn.unbox(layer.init(jax.random.key(1), x))
  out = layer.apply(params, x)
  kernel = params['params']['proj']['kernel'].reshape(4, 4, 3, 5)
  conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  conv = conv + params['params']['proj']['bias']
  assert_close_f32(out, conv.reshape(2, 6, 5))
  with pytest.raises(ValueError, match='divisible by patch size 5'):
    embeddings.patchify(x, 5)


def test_adaln_zero_block_starts_as_identity():
  block = Block(num_heads=2, conditioned=True)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  c = jax.random.normal(jax.random.key(1), (2, 16))
  params = nn.unbox(block.init(jax.random.key(2), x, c))
  np.testing.assert_array_equal(block.apply(params, x, c), x)
  perturbed = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 if 'adaln' in jax.tree_util.keystr(path) else p, params)
  assert np.abs(block.apply(perturbed, x, c) - x).max() > 1e-3


def test_compute_dtype_keeps_float32_params():
  block = Block(num_heads=2, dtype=jnp.bfloat16)
  x = jnp.ones((1, 4, 16))
  params = nn.unbox(block.init(jax.random.key(0), x))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  # the branches compute in bfloat16; the residual stream they add to stays float32 unless asked
  assert block.apply(params, x).dtype == jnp.float32
  assert block.clone(residual_dtype=jnp.bfloat16).apply(params, x).dtype == jnp.bfloat16


class _Unnamed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x @ self.param('w', nn.initializers.ones, (4, 4))


class _Named(nn.Module):
  names: tuple
  shape: tuple = (4, 4)

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.with_logical_partitioning(nn.initializers.ones, self.names), self.shape)
    return x


@pytest.mark.parametrize('module, message', [
    (_Unnamed(), 'without logical axis names'),
    (_Named(('embed', 'bogus')), 'not in the vocabulary'),
    (_Named(('embed',)), 'rank-2'),
    (_Named(('embed', 'embed')), 'used twice'),
    (_Named(('act_batch', 'embed')), 'used twice'),   # act_batch takes fsdp too
])
def test_validator_rejects(module, message):
  boxed = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((2, 4)))['params']
  with pytest.raises(ValueError, match=message):
    sharding.validate_param_axes(boxed)


def test_indivisible_weight_is_replicated_with_warning(caplog):
  mesh = sharding.make_mesh({'fsdp': 8})
  boxed = jax.eval_shape(_Named(('embed', 'mlp'), (6, 4)).init, jax.random.key(0),
                         jnp.ones((2, 4)))['params']
  with caplog.at_level('WARNING'):
    shardings = sharding.param_shardings(boxed, mesh)
  assert shardings['w'].spec == jax.sharding.PartitionSpec(None, None)
  assert 'w: dim 6 (embed) is not divisible' in caplog.text


def test_make_mesh_errors_name_numbers():
  assert sharding.make_mesh({'data': 2, 'fsdp': -1}).shape == {'data': 2, 'fsdp': 4, 'tensor': 1}
  with pytest.raises(ValueError, match='needs 6 devices but 8'):
    sharding.make_mesh({'data': 2, 'fsdp': 3})
  with pytest.raises(ValueError, match='unknown axes'):
    sharding.make_mesh({'model': 2})


@pytest.mark.parametrize('scan,remat,unroll', [
    (False, 'full', 1), (False, 'dots_saveable', 1), (True, 'none', 1), (True, 'dots_saveable', 1),
    (True, 'dots_with_no_batch_dims_saveable', 1), (True, True, 1), (True, 'none', 3),
    (True, 'full', 2)])
def test_scanned_and_remat_backbones_match_plain(scan, remat, unroll):
  """Every fast path gives the plain unrolled backbone's loss and gradients; the scanned one's
  parameters are the plain ones stacked on a leading 'layers' axis (stack_blocks)."""
  from layers.transformers import Backbone, stack_blocks, unstack_blocks
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  c = jax.random.normal(jax.random.key(1), (2, 16))
  plain = Backbone(depth=3, num_heads=2, conditioned=True)
  fast = Backbone(depth=3, num_heads=2, conditioned=True, remat=remat, scan=scan,
                  scan_unroll=unroll)
  params = nn.unbox(plain.init(jax.random.key(2), x, c))['params']
  params = jax.tree.map(lambda p: p + 0.05, params)     # leave adaLN-Zero's identity start
  fast_params = stack_blocks(params, 3) if scan else params
  boxed = fast.init(jax.random.key(2), x, c)['params']
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(fast_params)
  if scan:
    kernel = boxed['blocks']['mlp']['wi']['kernel']
    assert kernel.names == ('layers', 'embed', 'mlp') and kernel.value.shape == (3, 16, 64)
    assert jax.tree.all(jax.tree.map(np.array_equal, unstack_blocks(fast_params), params))
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(m.apply({'params': p}, x, c) ** 2)))
  (l1, g1), (l2, g2) = loss(plain)(params), loss(fast)(fast_params)
  assert_close_f32(l2, l1)
  # recomputation and the loop body fuse differently: the same math, other rounding (and
  # key-bias gradients that are zero in exact arithmetic come out as rounding noise)
  assert_trees_close_f32(g2, stack_blocks(g1, 3) if scan else g1)


def test_splash_backbone_scanned_and_rematerialised_matches_einsum():
  """The splash kernel inside a scanned, fully rematerialised causal backbone (the at-scale GPT's
  shape of call, its recomputation included): the einsum backbone's loss and gradients."""
  from layers.transformers import Backbone, stack_blocks
  x = jax.random.normal(jax.random.key(0), (2, 128, 16))
  plain = Backbone(depth=2, num_heads=2, causal=True)
  fast = Backbone(depth=2, num_heads=2, causal=True, attention_impl='splash', scan=True,
                  remat='full')
  params = nn.unbox(plain.init(jax.random.key(2), x))['params']
  loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply({'params': p}, x) ** 2)))
  (l1, g1), (l2, g2) = loss(plain)(params), loss(fast)(stack_blocks(params, 2))
  assert_close_f32(l2, l1)
  assert_trees_close_f32(g2, stack_blocks(g1, 2))


def test_scan_unroll_removes_the_loop_and_keeps_the_stacked_parameters():
  from layers.transformers import Backbone
  x = jnp.ones((2, 5, 16))
  loops = {}
  for unroll in (1, 2, 4):
    m = Backbone(depth=4, num_heads=2, scan=True, scan_unroll=unroll)
    params = m.init(jax.random.key(0), x)
    assert nn.unbox(params)['params']['blocks']['mlp']['wi']['kernel'].shape == (4, 16, 64)
    hlo = jax.jit(lambda p: m.apply(p, x)).lower(params).compile().as_text()
    loops[unroll] = ' while(' in hlo
  assert loops == {1: True, 2: True, 4: False}, loops   # unroll = depth: no loop at all
  with pytest.raises(ValueError, match='scan_unroll=2 applies to a scanned backbone'):
    Backbone(depth=4, num_heads=2, scan_unroll=2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='scan_unroll=0 must be at least 1'):
    Backbone(depth=4, num_heads=2, scan=True, scan_unroll=0).init(jax.random.key(0), x)


def test_remat_policy_names():
  from layers.transformers import remat_policy
  assert remat_policy('none') == (False, None) and remat_policy(False) == (False, None)
  assert remat_policy('full') == (True, None) and remat_policy(True) == (True, None)
  recompute, policy = remat_policy('dots_saveable')   # what it saves: tests/test_matmuls.py
  assert recompute and callable(policy)
  with pytest.raises(ValueError, match="remat 'some'"):
    remat_policy('some')


@pytest.mark.parametrize('use_bias', [True, False])
def test_fused_qkv_is_the_separate_projections_in_one_matmul(use_bias):
  """FUSED_QKV is a speed knob only: the same parameter tree, names, axes and initial draw as
  the separate projections, the same outputs and gradients, and one q/k/v matmul instead of
  three in the compiled step."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 32))
  separate = attentions.SelfAttention(num_heads=4, causal=True, use_bias=use_bias)
  fused = attentions.SelfAttention(num_heads=4, causal=True, use_bias=use_bias, fused_qkv=True)
  boxed_p = separate.init(jax.random.key(1), x)['params']
  boxed_q = fused.init(jax.random.key(1), x)['params']
  names = lambda tree: jax.tree.map(lambda b: b.names, tree,
                                    is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  assert names(boxed_q) == names(boxed_p)
  assert boxed_q['query']['kernel'].names == ('embed', 'heads', 'kv')
  p, q = nn.unbox(boxed_p), nn.unbox(boxed_q)
  jax.tree.map(np.testing.assert_array_equal, q, p)
  if use_bias:  # nonzero biases, so that a bias added to the wrong third would show
    p = {**p, **{n: {**p[n], 'bias': p[n]['bias'] + 0.1 * (i + 1)}
                 for i, n in enumerate(('query', 'key', 'value'))}}
  assert_close_f32(fused.apply({'params': p}, x), separate.apply({'params': p}, x))
  loss = lambda m: lambda params: jnp.sum(jnp.sin(m.apply({'params': params}, x)))
  jax.tree.map(assert_close_f32, jax.grad(loss(fused))(p), jax.grad(loss(separate))(p))
  dots = lambda m, x: jax.jit(m.apply).lower({'params': p}, x).as_text().count('dot_general')
  assert (dots(separate, x), dots(fused, x)) == (6, 4)  # q, k, v, scores, values, out
  # a one-token call (a decoding step) keeps the three matmuls rather than copy the weights
  assert dots(fused, x[:, :1]) == 6
