"""Comparing float32 results that were computed along different paths.

XLA's CPU code generation differs between CPU models (AVX2, AVX-512, AVX-512 FP16): the same
program may fuse, vectorise and reduce in another order, so the last bits differ from machine to
machine. An element-wise rtol fails on elements that are near zero only by cancellation, and an
absolute atol fails on tensors with large values. The bound here is relative to the tensor's own
scale (its largest magnitude), which is how float32 rounding error actually grows; a real bug
(a wrong path, a dropped term) is off by a large fraction of that scale and still fails.
Bit-exact checks stay where the computation is the same (resume).
"""
import numpy as np

F32_REL = 1e-4   # ~800 float32 ulps of the tensor's scale: holds on every x86 CPU seen here


def assert_close_f32(actual, desired, rel=F32_REL, err_msg=''):
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
  scale = max(float(np.abs(desired).max(initial=0.0)), 1e-30)
  err = float(np.abs(actual - desired).max(initial=0.0))
  assert err <= rel * scale, (f'{err_msg}: max abs error {err:.3g} exceeds {rel:g} x the '
                              f'tensor scale {scale:.3g}')


def assert_trees_close_f32(actual, desired, rel=F32_REL):
  """Leaf by leaf, against the scale of the whole tree: a leaf that is zero in exact arithmetic
  (a gradient that cancels) holds rounding noise of the size of the terms that cancelled."""
  import jax
  leaves = [np.abs(np.asarray(x, np.float64)).max(initial=0.0) for x in jax.tree.leaves(desired)]
  scale = max(leaves, default=0.0)
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_d = jax.tree.leaves(desired)
  assert len(flat_a) == len(flat_d)
  for (path, a), d in zip(flat_a, flat_d):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    err = float(np.abs(a - d).max(initial=0.0))
    assert err <= rel * scale, (f'{jax.tree_util.keystr(path)}: max abs error {err:.3g} exceeds '
                                f'{rel:g} x the tree scale {scale:.3g}')
