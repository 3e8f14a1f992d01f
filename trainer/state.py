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
from jax.sharding import NamedSharding, PartitionSpec as P

from layers import sharding
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


def make_init_state(model, task, tx, ema_decay: float):
  """key -> TrainState whose params (and optimizer moments) are still boxed with their names."""
  def init_state(key):
    params = model.init(key, *task.init_inputs(1))['params']
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


def make_train_step(model, task, tx, lr_fn, ema_decay: float, codec=None):
  """(state, batch, frozen) -> (state, metrics): one optimizer step; jit it with the state
  donated. uint8 images become floats in [-1, 1] here, on the device. With a `codec` (a frozen
  VAE whose params are `frozen`), the batch's images then become latents, drawn with this step's
  key."""
  def train_step(state, batch, frozen=None):
    batch = prepare_images(batch)
    # a fresh key per step from the stored one: a resumed run draws what a straight one did
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if codec is not None:
      batch = codec.prepare(frozen, batch, jax.random.fold_in(rng, CODEC_STREAM))
    (loss, aux), grads = jax.value_and_grad(
        lambda p: task.loss(model, p, batch, rng), has_aux=True)(state.params)
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
