"""Logical axis vocabulary, the one table that maps it to the mesh, and its validator.

Every weight is created through `nn.with_logical_partitioning(init, names)` with names from
`LOGICAL_AXES`; activations are pinned with `shard(x, names)` at block boundaries. The trainer
turns names into mesh shardings with `param_shardings`, after `validate_param_axes` has rejected
anything Flax would otherwise silently replicate.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical name -> mesh axis (or tuple of axes, or None = replicated). Order matters to Flax only
# when two names claim the same mesh axis, which the validator forbids anyway.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('act_batch', ('data', 'fsdp')),
    ('act_len', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('norm', None),
    ('layers', None),
    # Small input-side dims that DESIGN.md's table does not name; replicated on purpose.
    ('pos', None),     # rows of a learned position table
    ('patch', None),   # flattened p*p*c pixels of a patch (patch embedding in, final layer out)
    ('freq', None),    # sinusoidal features feeding the timestep MLP
    # Convolutions (the VAE, Inception): output channels shard like 'embed' when they are trained;
    # a frozen network is placed replicated instead (trainer.state.place_frozen).
    ('kernel_h', None),    # rows of a conv kernel's taps
    ('kernel_w', None),    # columns of a conv kernel's taps
    ('conv_in', None),     # input channels of a conv kernel
    ('conv_out', 'fsdp'),  # output channels of a conv kernel (and its bias)
)
LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)

log = logging.getLogger(__name__)


def _mesh_axes_of(name: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
  if name is None:
    return ()
  target = rules[name]
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_mesh_spec(names: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """('embed', 'mlp') -> P('fsdp', 'tensor') under the given rules."""
  table = dict(rules)
  out = []
  for name in names:
    axes = _mesh_axes_of(name, table)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def shard(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh or without rules.

  Dimensions the mesh axes do not divide are left unconstrained rather than failing inside
  jit (a batch of 2 on 8 devices during decoding, say).
  """
  spec = mesh_spec(x.shape, names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def mesh_spec(shape: Sequence[int], names: Sequence[str | None]) -> P | None:
  """The PartitionSpec `shard` pins on an array of `shape` under the current mesh and rules
  (None outside a mesh or without rules): also the per-device blocks a shard_map around a
  kernel that cannot be partitioned automatically takes (layers/attentions.splash_attention)."""
  split = _split(shape, names)
  if split is None:
    return None
  return P(*(None if not axes else axes[0] if len(axes) == 1 else axes for axes, _ in split))


def local_shape(shape: Sequence[int], names: Sequence[str | None]) -> tuple[int, ...]:
  """The per-device block of an array of `shape` that `shard` would pin (the whole shape outside
  a mesh or without rules)."""
  split = _split(shape, names)
  return tuple(shape) if split is None else tuple(d // size for d, (_, size) in zip(shape, split))


def _split(shape, names) -> list[tuple[tuple[str, ...], int]] | None:
  """For each dimension, the mesh axes that split it and their total size ((), 1 where none
  divides it); None outside a mesh or without rules."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  if len(names) != len(shape):
    raise ValueError(f'shard: {len(names)} names {tuple(names)} for an array of rank {len(shape)}')
  table = dict(rules)
  split = []
  for dim, name in zip(shape, names):
    axes = tuple(a for a in _mesh_axes_of(name, table) if a in mesh.axis_names)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    split.append(((), 1) if not axes or dim % size else (axes, size))
  return split


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def validate_param_axes(boxed_params, rules=DEFAULT_RULES) -> None:
  """Raise one ValueError listing every parameter Flax would mis-shard.

  `boxed_params` is the (abstract) params tree still holding `nn.LogicallyPartitioned` boxes,
  e.g. `jax.eval_shape(model.init, ...)['params']`.
  """
  table = dict(rules)
  problems = []

  def check(path, leaf):
    where = _path_str(path)
    if not isinstance(leaf, nn.LogicallyPartitioned):
      problems.append(f'{where}: created without logical axis names '
                      '(wrap its initializer in nn.with_logical_partitioning)')
      return
    names = tuple(leaf.names)
    if len(names) != len(leaf.value.shape):
      problems.append(f'{where}: {len(names)} names {names} for a rank-{len(leaf.value.shape)} '
                      f'array of shape {tuple(leaf.value.shape)}')
    unknown = [n for n in names if n is None or n not in table]
    if unknown:
      problems.append(f'{where}: names {unknown} are not in the vocabulary {sorted(table)}')
      return
    used = [a for n in names for a in _mesh_axes_of(n, table)]
    dup = sorted({a for a in used if used.count(a) > 1})
    if dup:
      problems.append(f'{where}: mesh axis {dup} used twice by names {names}; Flax would silently '
                      'replicate that dimension')

  jax.tree_util.tree_map_with_path(
      check, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  if problems:
    raise ValueError('invalid parameter partitioning:\n  ' + '\n  '.join(problems))


def _box_sharding(path, leaf, mesh: Mesh, table: Mapping[str, Any]) -> NamedSharding:
  spec = []
  for dim, name in zip(leaf.value.shape, leaf.names):
    axes = tuple(a for a in _mesh_axes_of(name, table) if mesh.shape.get(a, 1) > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if axes and dim % size:
      log.warning('%s: dim %d (%s) is not divisible by mesh axes %s of size %d; replicating it',
                  _path_str(path), dim, name, axes, size)
      axes = ()
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(*spec))


def param_shardings(boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding per parameter (same tree structure, boxes removed).

  A dimension its mesh axes do not divide is replicated, with one warning naming the weight,
  instead of an opaque failure inside jit.
  """
  validate_param_axes(boxed_params, rules)
  return tree_shardings(boxed_params, mesh, rules)


def tree_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """Like `param_shardings` for any tree (a train state, say): boxed leaves by their names,
  unboxed leaves (step counters, RNG keys) replicated. Optimizer moments built from boxed
  params are boxed too, so they follow their parameter's sharding."""
  table = dict(rules)
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _box_sharding(path, leaf, mesh, table) if is_box(leaf)
      else NamedSharding(mesh, P()), boxed_tree, is_leaf=is_box)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """Mesh over ('data', 'fsdp', 'tensor'); one axis may be -1 and takes the remaining devices."""
  shape = dict({'data': 1, 'fsdp': -1, 'tensor': 1}, **(shape or {}))
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'MESH has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}')
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  sizes = [int(shape[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'MESH {shape}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f'MESH {shape}: {n} devices are not divisible by the fixed axes ({known})')
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f'MESH {shape} needs {int(np.prod(sizes))} devices but {n} are present')
  try:  # topology-aware placement on TPU/GPU slices; plain order elsewhere
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices=list(devices.flat))
  except (ValueError, NotImplementedError, AssertionError):
    grid = devices.reshape(sizes)
  return Mesh(grid, MESH_AXES)


def sharded_init(init_fn, mesh: Mesh, *args, rules=DEFAULT_RULES):
  """Initialise parameters directly into their shardings: no host ever holds the full model.

  `init_fn(*args)` returns a params tree of `nn.LogicallyPartitioned` boxes (e.g.
  `lambda rng: model.init(rng, *inputs)['params']`). Returns (params, shardings), unboxed.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = param_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings
