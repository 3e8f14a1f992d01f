"""layers/matmuls.py: the 16-bit einsum with float32 accumulation and its written-out gradients."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from layers import matmuls
from layers.linears import DenseGeneral

BF16 = jnp.bfloat16


def _bf16(x):
  """float32 values exactly representable in bfloat16, so that casting loses nothing."""
  return np.asarray(jnp.asarray(x, BF16).astype(jnp.float32))


CASES = [   # spec, shapes; dense (unbatched) and attention-like (batched)
    ('bld,de->ble', (2, 5, 8), (8, 6)),
    ('bld,dnh->blnh', (2, 5, 8), (8, 3, 4)),
    ('blnh,bsnh->bnls', (2, 5, 3, 4), (2, 7, 3, 4)),
    ('bnls,bsnh->blnh', (2, 3, 5, 7), (2, 7, 3, 4)),
]


@pytest.mark.parametrize('spec,sa,sb', CASES)
def test_bf16_einsum_and_gradients_match_numpy(spec, sa, sb):
  rng = np.random.default_rng(0)
  a, b = _bf16(rng.normal(size=sa)), _bf16(rng.normal(size=sb))
  x, y, out = re.split(',|->', spec)
  g = _bf16(rng.normal(size=np.einsum(spec, a, b).shape))

  def loss(a, b):
    return jnp.sum(matmuls.einsum(spec, a, b, BF16, cpu_kernels=True).astype(jnp.float32) * g)

  value = matmuls.einsum(spec, a, b, BF16, cpu_kernels=True)
  assert value.dtype == BF16
  # float32 accumulation, one rounding to bfloat16 at the end (relative 2^-8)
  np.testing.assert_allclose(value.astype(np.float32), np.einsum(spec, a, b), rtol=1e-2, atol=1e-2)
  da, db = jax.grad(loss, argnums=(0, 1))(a, b)
  np.testing.assert_allclose(da, np.einsum(f'{out},{y}->{x}', g, b), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(db, np.einsum(f'{x},{out}->{y}', a, g), rtol=1e-2, atol=1e-2)


def test_bias_and_its_gradient_are_float32_sums():
  rng = np.random.default_rng(1)
  a, b = _bf16(rng.normal(size=(3, 4, 8))), _bf16(rng.normal(size=(8, 2, 5)))
  bias = rng.normal(size=(1, 5)).astype(np.float32)    # broadcast over the output's [2, 5]
  g = _bf16(rng.normal(size=(3, 4, 2, 5)))
  f = lambda a, b, bias: jnp.sum(matmuls.einsum('bld,dnh->blnh', a, b, BF16, bias=bias,
                                                cpu_kernels=True).astype(jnp.float32) * g)
  da, db, dbias = jax.grad(f, argnums=(0, 1, 2))(a, b, bias)
  assert dbias.dtype == jnp.float32 and dbias.shape == (1, 5)
  np.testing.assert_allclose(dbias, g.sum((0, 1, 2))[None], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(da, np.einsum('blnh,dnh->bld', g, b), rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(db, np.einsum('bld,blnh->dnh', a, g), rtol=1e-2, atol=1e-2)
  ref = np.einsum('bld,dnh->blnh', a, b) + bias
  out = matmuls.einsum('bld,dnh->blnh', a, b, BF16, bias=bias, cpu_kernels=True)
  np.testing.assert_allclose(out.astype(np.float32), ref, rtol=1e-2, atol=1e-2)


def test_float32_and_accelerator_paths_are_the_plain_einsum():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
  plain = jnp.einsum('md,de->me', a, b)
  np.testing.assert_array_equal(matmuls.einsum('md,de->me', a, b, cpu_kernels=True), plain)
  # float32 never takes the written-out gradient, with or without the CPU kernels
  jaxpr = lambda dtype: str(jax.make_jaxpr(
      lambda a, b: matmuls.einsum('md,de->me', a, b, dtype, cpu_kernels=True))(a, b))
  assert 'custom_vjp' not in jaxpr(jnp.float32) and 'custom_vjp' in jaxpr(BF16)
  # bfloat16 without the CPU kernels: the dot XLA is given is the plain bf16 x bf16 -> bf16 one
  hlo = jax.jit(lambda a, b: matmuls.einsum('md,de->me', a, b, BF16, cpu_kernels=False)
                ).lower(a, b).as_text()
  assert re.search(r'dot_general.*-> tensor<4x3xbf16>', hlo), hlo


@pytest.mark.parametrize('spec,shapes', [('md,de->me', ((4, 8), (8, 3))),
                                         ('bld,bsd->bls', ((2, 4, 8), (2, 5, 8)))])
def test_accelerator_bf16_dots_widened_to_float32_keep_bf16_gradient_matmuls(spec, shapes):
  """Attention scores and vocabulary logits: bf16 operands, a float32 result. Autodiff of that
  dot pairs the float32 cotangent with a bf16 operand, which XLA runs as a float32 matmul; the
  accelerator path (cpu_kernels=False) rounds the cotangent to bf16 first, so every matmul of
  the forward and backward passes takes bf16 operands, and the gradients match autodiff's."""
  rng = np.random.default_rng(5)
  a, b = (rng.normal(size=s).astype(np.float32) for s in shapes)
  g = rng.normal(size=np.einsum(spec, a, b).shape).astype(np.float32)
  def loss(einsum):
    return lambda a, b: jnp.sum(einsum(a, b) * g)
  ours = loss(lambda a, b: matmuls.einsum(spec, a, b, BF16, out_dtype=jnp.float32,
                                          cpu_kernels=False))
  plain = loss(lambda a, b: jnp.einsum(spec, a.astype(BF16), b.astype(BF16),
                                       preferred_element_type=jnp.float32))
  hlo = jax.jit(jax.value_and_grad(ours, argnums=(0, 1))).lower(a, b).as_text()
  dots = re.findall(r'stablehlo.dot_general.*: \((tensor<[^)]*)\) -> (tensor<\S+>)', hlo)
  assert len(dots) == 3, hlo     # forward, then each operand's gradient
  for operands, _ in dots:
    assert operands.count('bf16') == 2 and 'f32' not in operands, operands
  plain_hlo = jax.jit(jax.grad(plain, argnums=(0, 1))).lower(a, b).as_text()
  assert re.search(r'stablehlo.dot_general.*: \(tensor<[^)]*f32', plain_hlo)  # what it fixes
  for got, want in zip(jax.grad(ours, argnums=(0, 1))(a, b), jax.grad(plain, argnums=(0, 1))(a, b)):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_accelerator_widened_dot_with_a_bias_and_float16_left_to_autodiff():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
  bias, g = rng.normal(size=(3,)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
  ours = lambda a, b, bias: jnp.sum(matmuls.einsum('md,de->me', a, b, BF16, bias=bias,
                                                   out_dtype=jnp.float32, cpu_kernels=False) * g)
  ref = lambda a, b, bias: jnp.sum((jnp.einsum('md,de->me', a.astype(BF16), b.astype(BF16),
                                               preferred_element_type=jnp.float32) + bias) * g)
  np.testing.assert_allclose(ours(a, b, bias), ref(a, b, bias), rtol=1e-6)
  got, want = jax.grad(ours, (0, 1, 2))(a, b, bias), jax.grad(ref, (0, 1, 2))(a, b, bias)
  for x, y in zip(got[:2], want[:2]):
    np.testing.assert_allclose(np.asarray(x, np.float32), y, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(got[2], g.sum(0), rtol=1e-6)          # the bias: exact, float32
  # float16 keeps autodiff's float32 cotangent (a mean loss's would underflow float16)
  f16 = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(matmuls.einsum(
      'md,de->me', a, b, jnp.float16, out_dtype=jnp.float32, cpu_kernels=False))))(a, b)
  assert 'custom_vjp' not in str(f16)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU path: other backends keep '
                    'the plain dot (test_float32_and_accelerator_paths_are_the_plain_einsum)')
def test_bf16_dense_compiles_to_native_bf16_dots_only():
  """The point of the module: in the compiled forward and backward passes of a bfloat16 Dense
  every dot takes bfloat16 operands and returns float32 (the form XLA CPU runs natively), and
  none takes float32 operands (a dot XLA CPU had widened)."""
  layer = DenseGeneral(16, ('embed', 'mlp'), dtype=BF16)
  x = jnp.ones((4, 8, 32), jnp.float32)
  params = layer.init(jax.random.key(0), x)
  loss = lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  dots = re.findall(r'= (\w+)\[[^\]]*\][^ ]* dot\((%[^,]+), (%[^)]+)\)', hlo)
  assert len(dots) == 3, dots    # forward, the kernel's and the input's gradients
  types = dict(re.findall(r'(%\S+) = (\w+)\[', hlo))
  for out_type, lhs, rhs in dots:
    assert (out_type, types[lhs], types[rhs]) == ('f32', 'bf16', 'bf16'), (out_type, lhs, rhs)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='packing happens on the CPU backend only')
def test_residuals_of_16_bit_floats_are_packed_as_their_bits():
  x = jnp.asarray([1.0, -2.5, 3e-3, jnp.inf], BF16)
  packed = matmuls.pack_residual(x)
  assert packed.dtype == jnp.uint16                        # the tests run on the CPU backend
  assert np.array_equal(np.asarray(packed), np.asarray(x).view(np.uint16))
  back = matmuls.unpack_residual(packed, BF16)
  assert back.dtype == BF16 and np.array_equal(np.asarray(back), np.asarray(x))
  y = jnp.arange(3.0)
  assert matmuls.pack_residual(y) is y and matmuls.unpack_residual(y, jnp.float32) is y
  n = jnp.arange(3, dtype=jnp.int16)                       # integers are stacked natively
  assert matmuls.pack_residual(n) is n
  u = jnp.arange(3, dtype=jnp.uint16)                      # a genuine uint16 stays one
  assert matmuls.cpu_16bit(BF16, cpu_kernels=True) and matmuls.cpu_16bit(jnp.float16, True)
  assert not matmuls.cpu_16bit(BF16, cpu_kernels=False)   # accelerators: the plain path
  assert not matmuls.cpu_16bit(jnp.int16, True) and not matmuls.cpu_16bit(jnp.float32, True)
  assert matmuls.unpack_residual(u, jnp.uint16) is u and matmuls.unpack_residual(u, jnp.int32) is u


def _stacked_16_bit_writes(hlo: str) -> list[str]:
  """Dynamic-update-slices that write a 16-bit float array, fused or not: XLA's CPU backend
  runs each as a float32 copy of the whole buffer, converted there and back."""
  found = re.findall(r'= (?:bf|f)16\[[^\]]*\]\S* dynamic-update-slice\(', hlo)
  for head, body in re.findall(r'\n(%\S+ \([^\n]*\) -> (?:bf|f)16\[[^\n]*)\{\n(.*?)\n\}', hlo,
                               re.S):
    if 'dynamic-update-slice(' in body:
      found.append(head)
  return found


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='packing happens on the CPU backend only')
def test_scanned_bf16_backbone_stacks_no_16_bit_residuals():
  """Under nn.scan every array kept for the backward pass is written into a [depth, ...] buffer
  a layer at a time; in bfloat16 on XLA's CPU backend each such write was a float32 round trip
  of the whole buffer (1.3x slower steps, docs/PERFORMANCE.md). The matmuls, GELU and adaLN
  gates keep their 16-bit residuals as uint16 bits instead, so no such write is left."""
  from layers.transformers import Backbone
  m = Backbone(depth=3, num_heads=2, conditioned=True, scan=True, dtype=BF16)
  x = jnp.ones((2, 8, 16))
  c = jnp.ones((2, 16))
  params = m.init(jax.random.key(0), x, c)
  loss = lambda p: jnp.sum(m.apply(p, x, c).astype(jnp.float32) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert ' while(' in hlo and 'dynamic-update-slice(' in hlo    # a loop stacking residuals
  assert _stacked_16_bit_writes(hlo) == []


def test_bf16_scanned_backbone_matches_unrolled_within_bf16_rounding():
  from layers.transformers import Backbone, stack_blocks
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  c = jax.random.normal(jax.random.key(1), (2, 16))
  plain = Backbone(depth=3, num_heads=2, conditioned=True, dtype=BF16)
  scanned = Backbone(depth=3, num_heads=2, conditioned=True, dtype=BF16, scan=True)
  params = nn.unbox(plain.init(jax.random.key(2), x, c))['params']
  params = jax.tree.map(lambda p: p + 0.05, params)     # leave adaLN-Zero's identity start
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(m.apply({'params': p}, x, c).astype(jnp.float32) ** 2)))
  (l1, g1), (l2, g2) = loss(plain)(params), loss(scanned)(stack_blocks(params, 3))
  np.testing.assert_allclose(l2, l1, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(stack_blocks(g1, 3))):
    np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-2 * float(jnp.abs(b).max()))


def test_bf16_dense_matches_float32_dense_within_bf16_rounding():
  x = jax.random.normal(jax.random.key(1), (4, 8, 32))
  f32 = DenseGeneral((2, 8), ('embed', 'heads', 'kv'))
  bf16 = DenseGeneral((2, 8), ('embed', 'heads', 'kv'), dtype=BF16)
  params = nn.unbox(f32.init(jax.random.key(0), x))
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32)))
  (l32, g32), (l16, g16) = (jax.value_and_grad(loss(m))(params) for m in (f32, bf16))
  np.testing.assert_allclose(l16, l32, rtol=2e-2)
  for k in ('kernel', 'bias'):
    ref = g32['params'][k]
    err = jnp.abs(g16['params'][k] - ref).max() / jnp.abs(ref).max()
    assert err < 2e-2, (k, float(err))


@pytest.mark.parametrize('spec,message', [
    ('...d,vd->...v', "no '...'"),
    ('md,de', 'no implicit output'),
    ('mdk,de->me', "the first operand sums axes ['k'] on its own"),
    ('md,mm->d', 'the second operand repeats a letter'),
])
def test_specs_without_einsum_gradients_are_refused(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):   # checked before any shape
    matmuls.einsum(spec, jnp.ones((2, 2)), jnp.ones((2, 2)), BF16, cpu_kernels=True)


def test_dense_spec():
  assert matmuls.dense_spec(3, 1, 2) == 'abc,cd->abd'
  assert matmuls.dense_spec(4, 2, 3) == 'abcd,cde->abe'
  x, k = np.ones((2, 3, 4, 5)), np.ones((4, 5, 6))
  assert np.einsum(matmuls.dense_spec(4, 2, 3), x, k).shape == (2, 3, 6)


@pytest.mark.parametrize('remat,saved,plain_dots', [
    ('dots_saveable', {'matmul', 'batched_matmul'}, 1),
    ('dots_with_no_batch_dims_saveable', {'matmul'}, 1),
    ('full', set(), 0),
])
def test_remat_dot_policies_save_the_cpu_bf16_matmuls_by_name(remat, saved, plain_dots, capsys):
  """A dot inside the written-out gradient is invisible to jax.checkpoint's dot policies: the
  op's output is named instead, and the policies keep what they keep on the plain path (whose
  float32 dot they still save as a dot)."""
  from layers.transformers import remat_policy
  _, policy = remat_policy(remat)

  def block(a, b, p):   # sin: the backward pass needs each matmul's output
    h = matmuls.einsum('md,de->me', a, b, BF16, cpu_kernels=True)          # unbatched
    s = matmuls.einsum('bld,bsd->bls', p, p, BF16, cpu_kernels=True)       # batched
    f = matmuls.einsum('md,de->me', a, b)                                  # float32: plain
    return (jnp.sum(jnp.sin(h.astype(jnp.float32))) + jnp.sum(jnp.sin(s.astype(jnp.float32)))
            + jnp.sum(jnp.sin(f)))

  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(block, policy=policy),
                                          jnp.ones((4, 8)), jnp.ones((8, 3)), jnp.ones((2, 5, 4)))
  printed = capsys.readouterr().out
  assert set(re.findall(r"named '(\w+)'", printed)) == saved, printed
  assert printed.count('output of dot_general') == plain_dots, printed
