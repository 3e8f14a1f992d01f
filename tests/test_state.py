"""trainer/state.py: how data shards sum their gradients (GRAD_SYNC: the flat path's one
all-reduce gives the partitioner's step, its per-shard keys are the documented ones, the choice
is checked), and the initial draw that SCAN_LAYERS does not change."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from layers import sharding, transformers
from models.dit import DiT
from models.gpt import GPT
from models.vit import ViT
from tasks import diffusion
from tasks.classification import Classification
from tasks.language import LanguageModeling
from tests.numerics import assert_close_f32, assert_trees_close_f32
from trainer import state as state_lib

DATA_MESH = {'data': -1, 'fsdp': 1, 'tensor': 1}


def _vit_setup(batch=16):
  model = ViT(image_size=16, channels=3, patch=4, hidden=32, depth=2, heads=2, num_classes=10,
              scan_layers=True)
  task = Classification(num_classes=10, image_size=16, channels=3)
  rng = np.random.default_rng(0)
  data = {'image': rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8),
          'label': rng.integers(0, 10, (batch,)).astype(np.int32)}
  return model, task, data


def _run(model, task, data, grad_sync, steps=2):
  """`steps` jitted train steps on the 8-device data mesh; (state, metrics, compiled step)."""
  mesh = sharding.make_mesh(DATA_MESH)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  init = state_lib.make_init_state(model, task, tx, ema_decay=0.9)
  shardings, _ = state_lib.shard_state(init, jax.random.key(0), mesh)
  batch_sharding = state_lib.batch_sharding(mesh, len(data['label']))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    state = state_lib.initialize(init, jax.random.key(0), shardings)
    batch = jax.device_put(data, batch_sharding)
    step = jax.jit(state_lib.make_train_step(model, task, tx, lambda s: 1e-2, 0.9, None, mesh,
                                             grad_sync),
                   in_shardings=(shardings, batch_sharding, None),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    compiled = step.lower(state, batch, None).compile()
    for _ in range(steps):
      state, metrics = compiled(state, batch, None)
  return jax.device_get(state), jax.device_get(metrics), compiled


def test_flat_sync_takes_the_partitioners_step_with_one_all_reduce():
  model, task, data = _vit_setup()
  spmd_state, spmd_metrics, _ = _run(model, task, data, 'spmd')
  flat_state, flat_metrics, compiled = _run(model, task, data, 'flat')
  assert set(flat_metrics) == set(spmd_metrics)
  for k in spmd_metrics:
    assert_close_f32(flat_metrics[k], spmd_metrics[k], err_msg=k)
  for new in ('params', 'ema', 'opt_state'):
    assert_trees_close_f32(getattr(flat_state, new), getattr(spmd_state, new))
  # every gradient, the loss and the accuracy travel together: one collective in the program
  assert compiled.as_text().count(' all-reduce(') == 1


def test_each_shard_draws_from_its_own_key_and_the_means_are_exact():
  """The flat path against its definition, on one device: each shard's loss and gradients with
  the step's key and the shard's index folded in, averaged."""
  model = DiT(image_size=8, channels=3, patch=2, hidden=32, depth=1, heads=2, num_classes=10)
  task = diffusion.FlowMatching(num_classes=10, class_dropout_prob=0.5)
  rng = np.random.default_rng(1)
  batch = {'image': rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, (16,)).astype(np.int32)}
  params = model.init(jax.random.key(0), batch['image'][:1], jnp.zeros((1,)),
                      batch['label'][:1])['params']
  key = jax.random.key(7)

  def loss_and_grad(p, b, r):
    (loss, aux), grads = jax.value_and_grad(lambda q: task.loss(model, q, b, r), has_aux=True)(p)
    aux = {**aux, 'draw': jax.random.uniform(r)}   # which key each shard saw
    return (loss, aux), grads

  mesh = sharding.make_mesh(DATA_MESH)
  with jax.set_mesh(mesh):
    (loss, aux), grads = jax.jit(state_lib.data_parallel_grads(loss_and_grad, mesh))(
        params, batch, key)
  n = mesh.shape['data']
  rows = len(batch['label']) // n
  shards = [jax.jit(loss_and_grad)(params, jax.tree.map(lambda x: x[i * rows:(i + 1) * rows],
                                                        batch), jax.random.fold_in(key, i))
            for i in range(n)]
  mean = lambda *xs: np.mean(np.stack(xs), axis=0)
  (want_loss, want_aux), want_grads = jax.tree.map(mean, *shards)
  assert_close_f32(loss, want_loss)
  assert_close_f32(aux['draw'], want_aux['draw'])
  assert_trees_close_f32(grads, want_grads)
  draws = [float(s[0][1]['draw']) for s in shards]
  assert len(set(draws)) == n   # the shards' noise is not one draw repeated


@pytest.mark.parametrize('mesh_shape, platform, asked, want', [
    (DATA_MESH, 'cpu', 'auto', 'flat'),
    (DATA_MESH, 'gpu', 'auto', 'spmd'),     # accelerators overlap the partitioner's collectives
    ({'data': 1, 'fsdp': -1, 'tensor': 1}, 'cpu', 'auto', 'spmd'),   # sharded parameters
    ({'data': 2, 'fsdp': 4, 'tensor': 1}, 'cpu', 'auto', 'spmd'),
    (DATA_MESH, 'gpu', 'flat', 'flat'),
    (DATA_MESH, 'cpu', 'spmd', 'spmd'),
])
def test_auto_picks_flat_for_data_parallel_cpu_meshes(mesh_shape, platform, asked, want):
  mesh = sharding.make_mesh(mesh_shape)

  class _Device:   # the resolution reads only the platform of the mesh's devices
    def __init__(self, platform):
      self.platform = platform

  class _Mesh:
    shape = dict(mesh.shape)
    devices = np.array([_Device(platform)] * mesh.size)

  assert state_lib.resolve_grad_sync(asked, _Mesh()) == want


def test_flat_sync_refuses_sharded_parameters_and_unknown_values():
  with pytest.raises(state_lib.TrainError, match=r"GRAD_SYNC=flat .* mesh is \{'data': 2, "
                     r"'fsdp': 4, 'tensor': 1\}.*GRAD_SYNC=spmd"):
    state_lib.resolve_grad_sync('flat', sharding.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1}))
  with pytest.raises(state_lib.TrainError, match="GRAD_SYNC='pmap': use one of 'auto', 'spmd', "
                     "'flat'"):
    state_lib.resolve_grad_sync('pmap', sharding.make_mesh(DATA_MESH))


@pytest.mark.parametrize('family', ['vit', 'gpt'])
def test_unscanned_blocks_draw_what_the_scanned_ones_draw(family):
  """SCAN_LAYERS changes the layout and speed, not the start: the unscanned model's initial
  params are the scanned model's, unstacked, with the names the unscanned model declares; and
  both compute the same loss from them."""
  if family == 'vit':
    model, task, data = _vit_setup(batch=4)
    batch = {**data, 'image': data['image'].astype(np.float32) / 127.5 - 1}
  else:
    model = GPT(vocab_size=300, max_len=16, hidden=32, depth=3, heads=2, vocab_multiple=1)
    task = LanguageModeling(seq_len=16)
    batch = {'tokens': np.random.default_rng(0).integers(0, 300, (4, 17)).astype(np.int32)}
  scanned = model.clone(scan_layers=True)
  plain = model.clone(scan_layers=False)
  key = jax.random.key(3)
  got = state_lib.init_params(plain, task, key)
  want_boxes = plain.init(key, *task.init_inputs(1))['params']   # the layout flax declares
  names = lambda t: jax.tree.map(lambda b: (b.names, b.value.shape), t,
                                 is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert names(got) == names(want_boxes)
  stacked = nn.unbox(state_lib.init_params(scanned, task, key))
  got = nn.unbox(got)
  jax.tree.map(np.testing.assert_array_equal, got, nn.unbox(transformers.unstack_all(stacked)))
  # not the draw flax would make for the unscanned layout on its own
  assert not np.array_equal(jax.tree.leaves(got)[5], jax.tree.leaves(nn.unbox(want_boxes))[5])
  loss = lambda m, p: task.loss(m, p, batch, jax.random.key(0))[0]
  assert_close_f32(loss(plain, got), loss(scanned, stacked))
