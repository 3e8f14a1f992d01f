"""The train state, its sharded initialisation, and the train step: shared by the loop and the
benchmark so that what is measured is what is trained."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from layers import sharding, transformers
from tasks.common import prepare_images


CODEC_STREAM = 0x7AE   # folded into a step's key for the codec's draws, apart from the task's
EVAL_STREAM = 0xE7A1   # the eval split's key, before each batch's index is folded in


class TrainError(RuntimeError):
  """A setup problem the user can fix; the message says how."""


def batch_sharding(mesh, global_batch: int):
  """Batches split their first dim over ('data', 'fsdp'); the size must divide evenly."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % shards:
    raise TrainError(f'GLOBAL_BATCH={global_batch} is not divisible by the data x fsdp mesh '
                     f'size {shards}; pick a multiple of {shards}')
  return NamedSharding(mesh, P(('data', 'fsdp')))


def process_rows(sharding, global_batch: int) -> np.ndarray:
  """The rows of each global batch that this process's devices hold, ascending, read off the
  batch sharding's own device-to-index map. Where the mesh's other axes span hosts (tensor
  parallelism across hosts, say), several processes hold the same rows and must load the same
  data; dividing the batch by process_index alone would feed their replicas different rows."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  return np.array(sorted(rows), dtype=np.int64)


def feed(sources, sharding, global_batch: int) -> None:
  """Point each data source (None skipped) at this process's rows of the batch sharding."""
  rows = process_rows(sharding, global_batch)
  for source in sources:
    if source is not None:
      source.assign_rows(rows)


def to_global(sharding, local, global_batch: int):
  """This process's rows of a batch (a pytree of arrays, as from a fed source) -> global arrays.
  The global shape is explicit: where one process holds the whole batch, local is global."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (global_batch, *np.shape(x)[1:])), local)


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of steps taken
  params: Any
  opt_state: Any
  ema: Any                 # EMA of params, or None
  rng: jax.Array           # raw uint32 key data (Orbax stores no typed keys)


def init_params(model, task, key):
  """The model's params, still boxed with their names. A model with unscanned blocks
  (scan_layers=False) draws them as its scanned twin does and unstacks them: SCAN_LAYERS changes
  the layout and the speed, never the initial draw (flax derives each block's key differently
  in the two layouts)."""
  inputs = task.init_inputs(1)
  if getattr(model, 'scan_layers', True):
    return model.init(key, *inputs)['params']
  twin = model.clone(scan_layers=True)
  return transformers.unstack_all(twin.init(key, *inputs)['params'])


def make_init_state(model, task, tx, ema_decay: float):
  """key -> TrainState whose params (and optimizer moments) are still boxed with their names."""
  def init_state(key):
    params = init_params(model, task, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=params if ema_decay else None,
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))
  return init_state


def shard_state(init_state, key, mesh, rules=sharding.DEFAULT_RULES):
  """(shardings, abstract state with those shardings), after validating the parameter names."""
  boxed = jax.eval_shape(init_state, key)
  sharding.validate_param_axes(boxed.params, rules)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          nn.unbox(boxed), shardings)
  return shardings, abstract


def initialize(init_state, key, shardings):
  """Run `init_state` under jit straight into `shardings`: no host holds the full state."""
  return jax.jit(lambda k: nn.unbox(init_state(k)), out_shardings=shardings)(key)


def place_frozen(codec, mesh, rules=sharding.DEFAULT_RULES):
  """(params, shardings) of a frozen codec (a VAE) on the mesh; (None, None) without a codec.

  Replicated: a frozen network has no optimizer state to spread, and a full copy on each device
  encodes that device's rows of the batch with no all-gather of weights. Its logical names are
  still checked, so the same network can be trained sharded (tasks/autoencoding.py). Every
  process holds the full host copy and each device takes it from there (across hosts too).
  """
  if codec is None:
    return None, None
  sharding.validate_param_axes(codec.abstract_params(), rules)
  host = jax.tree.map(np.asarray, codec.params)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), host)
  params = jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x[index]),
      host, shardings)
  return params, shardings


GRAD_SYNCS = ('auto', 'spmd', 'flat')


def resolve_grad_sync(grad_sync: str, mesh) -> str:
  """'spmd' or 'flat', as `make_train_step` will run, for a GRAD_SYNC knob value and a mesh.

  'spmd': XLA's partitioner reduces each gradient where it is made, one collective per
  parameter (inside the scan's loop for scanned blocks); accelerators overlap these with the
  backward pass. 'flat': each data shard takes its own gradients and one all-reduce of them all,
  flattened into one vector, ends the step; on a CPU that is much cheaper (XLA's CPU collectives
  synchronise the devices' threads once per operand: docs/PERFORMANCE.md). It needs the
  parameters whole on every device, a mesh that is data-parallel only. 'auto': 'flat' for such
  a mesh of CPU devices, 'spmd' otherwise."""
  if grad_sync not in GRAD_SYNCS:
    raise TrainError(f'GRAD_SYNC={grad_sync!r}: use one of {", ".join(map(repr, GRAD_SYNCS))}')
  data_only = (mesh is not None and mesh.shape.get('data', 1) > 1
               and all(size == 1 for axis, size in mesh.shape.items() if axis != 'data'))
  if grad_sync == 'flat' and not data_only:
    shape = None if mesh is None else dict(mesh.shape)
    raise TrainError(f'GRAD_SYNC=flat reduces the gradients over the data axis alone, but the '
                     f'mesh is {shape}: it needs data > 1 and every other axis 1 (e.g. MESH='
                     "{'data': -1, 'fsdp': 1, 'tensor': 1}), or GRAD_SYNC=spmd")
  if grad_sync == 'auto':
    cpu = mesh is not None and mesh.devices.flat[0].platform == 'cpu'
    return 'flat' if data_only and cpu else 'spmd'
  return grad_sync


def data_parallel_grads(loss_and_grad, mesh, axis: str = 'data'):
  """`loss_and_grad(params, batch, rng) -> ((loss, aux), grads)` run on each data shard of the
  batch alone, the results averaged over the shards by one all-reduce of one flat vector. Exact
  for losses and aux metrics that are means over the batch (every task's are) and equal shards
  (batch_sharding makes them so). Each shard draws from its own key, `rng` with the shard's
  index folded in, so a task's random draws depend on the number of shards (the partitioner's
  step draws for the whole batch at once, whatever the mesh)."""
  n = mesh.shape[axis]

  def local(params, batch, rng):
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis))
    # the body sees one device's block: logical sharding constraints have nothing to split
    with nn.logical_axis_rules(()):
      out = loss_and_grad(params, batch, rng)
    flat, unravel = ravel_pytree(out)
    return unravel(jax.lax.psum(flat, axis) / n)

  # check_vma=False: the layers' custom VJPs (LayerNorm, GELU) return per-shard cotangents for
  # replicated params, which the varying-axis checker refuses; the psum above makes them whole
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=P(),
                       check_vma=False)


def make_train_step(model, task, tx, lr_fn, ema_decay: float, codec=None, mesh=None,
                    grad_sync: str = 'spmd'):
  """(state, batch, frozen) -> (state, metrics): one optimizer step; jit it with the state
  donated. uint8 images become floats in [-1, 1] here, on the device. With a `codec` (a frozen
  VAE whose params are `frozen`), the batch's images then become latents, drawn with this step's
  key. `grad_sync` ('auto' | 'spmd' | 'flat', over `mesh`): how the data shards' gradients are
  summed (resolve_grad_sync)."""
  loss_and_grad = jax.value_and_grad(lambda p, b, r: task.loss(model, p, b, r), has_aux=True)
  if resolve_grad_sync(grad_sync, mesh) == 'flat':
    loss_and_grad = data_parallel_grads(loss_and_grad, mesh)

  def train_step(state, batch, frozen=None):
    batch = prepare_images(batch)
    # a fresh key per step from the stored one: a resumed run draws what a straight one did
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if codec is not None:
      batch = codec.prepare(frozen, batch, jax.random.fold_in(rng, CODEC_STREAM))
    (loss, aux), grads = loss_and_grad(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    grad_norm, param_norm = optax.global_norm(grads), optax.global_norm(params)
    # A step whose loss, gradients or new parameters are not finite changes nothing but the
    # step count (its batch is consumed): NaN never reaches the state, hence no checkpoint.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'param_norm': param_norm,
               'lr': lr_fn(state.step), 'finite': finite, **aux}
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         ema=keep(ema, state.ema)), metrics
  return train_step


def make_eval_step(model, task, codec=None):
  """(params, batch, frozen, index) -> the task's eval sums (uint8 images scaled to [-1, 1] first,
  as in the train step). Random draws (the task's noise, a codec's posterior samples) come from
  a fixed key with the eval batch's `index` folded in: every checkpoint's eval sees the same
  draws, and each batch its own."""
  def eval_step(params, batch, frozen=None, index=0):
    key = jax.random.fold_in(jax.random.key(EVAL_STREAM), index)
    batch = prepare_images(batch)
    if codec is not None:
      batch = codec.prepare(frozen, batch, jax.random.fold_in(key, CODEC_STREAM))
    return task.eval_step(model, params, batch, key)
  return eval_step


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
