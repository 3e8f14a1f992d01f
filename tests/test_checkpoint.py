"""Checkpointer: sharded round trip, resharding on restore, retention, meta, errors."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax

try:  # 8 CPU devices; must happen before any JAX operation in this process
  jax.config.update('jax_num_cpu_devices', 8)
except RuntimeError:  # backends already up (conftest or an earlier test module); checked below
  pass

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainer.checkpoint import Checkpointer


@pytest.fixture(scope='module')
def mesh():
  # CPU devices explicitly, so the test means the same on a GPU machine.
  devices = jax.devices('cpu')
  assert len(devices) >= 8, f'needs 8 CPU devices, JAX has {len(devices)}'
  return Mesh(np.array(devices[:8]), ('fsdp',))


def make_state(mesh, step=7):
  w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) / 3 + step
  return {
      'params': {'w': jax.device_put(w, NamedSharding(mesh, P('fsdp', None))),
                 'b': jax.device_put(jnp.linspace(-1, 1, 5, dtype=jnp.bfloat16),
                                     NamedSharding(mesh, P()))},
      'rng': jax.device_put(jax.random.key_data(jax.random.key(step)), NamedSharding(mesh, P())),
      'step': step,
  }


def abstract_of(state):
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, state)


def assert_same(restored, expected_values, abstract):
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  for r, e, a in zip(jax.tree.leaves(restored), jax.tree.leaves(expected_values),
                     jax.tree.leaves(abstract)):
    if isinstance(a, jax.ShapeDtypeStruct):
      assert r.dtype == a.dtype and r.shape == a.shape
      assert r.sharding == a.sharding
      np.testing.assert_array_equal(np.asarray(r), np.asarray(e))  # bitwise for these dtypes
    else:
      assert r == e


def test_round_trip_with_meta(mesh, tmp_path):
  state = make_state(mesh)
  expected = jax.device_get(state)
  assert expected['rng'].dtype == np.uint32
  abstract = abstract_of(state)
  ckpt = Checkpointer(str(tmp_path / 'ckpt'))
  meta = {'data_position': 1234, 'experiment': 'DiT_T', 'nested': {'a': [1, 2.5]}}
  ckpt.save(7, state, meta)
  # An async save has already copied the arrays to host: donating them must be safe.
  for x in jax.tree.leaves(state):
    if isinstance(x, jax.Array):
      x.delete()
  ckpt.wait()
  assert ckpt.latest_step() == 7
  restored, restored_meta = ckpt.restore(abstract)
  assert_same(restored, expected, abstract)
  assert restored_meta == meta
  key = jax.random.wrap_key_data(restored['rng'])  # how callers rebuild a typed key
  assert jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
  ckpt.close()


def test_restore_into_other_sharding(mesh, tmp_path):
  state = make_state(mesh)
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {})
  for spec in [P(), P(None, 'fsdp')]:
    abstract = abstract_of(state)
    abstract['params']['w'] = jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                                   sharding=NamedSharding(mesh, spec))
    restored, _ = ckpt.restore(abstract)
    assert_same(restored, state, abstract)
  # Casting on restore: the abstract dtype wins.
  abstract = abstract_of(state)
  abstract['params']['w'] = jax.ShapeDtypeStruct((16, 8), jnp.bfloat16,
                                                 sharding=NamedSharding(mesh, P()))
  restored, _ = ckpt.restore(abstract)
  assert restored['params']['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(restored['params']['w'],
                                state['params']['w'].astype(jnp.bfloat16))
  ckpt.close()


def test_keep_last_and_reopen(mesh, tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2)
  for step in (10, 20, 30):
    ckpt.save(step, make_state(mesh, step), {'step': step})
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['20', '30']

  ckpt = Checkpointer(str(tmp_path), keep=2)  # a resumed run sees the same steps
  assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
  abstract = abstract_of(make_state(mesh))
  restored, meta = ckpt.restore(abstract, step=20)
  assert_same(restored, make_state(mesh, 20), abstract)
  assert meta == {'step': 20}
  with pytest.raises(FileNotFoundError, match='step 10'):
    ckpt.restore(abstract, step=10)
  ckpt.close()


def test_existing_step_is_kept_unless_forced(mesh, tmp_path):
  ckpt = Checkpointer(str(tmp_path))
  abstract = abstract_of(make_state(mesh))
  ckpt.save(5, make_state(mesh, 1), {'v': 1})
  ckpt.save(5, make_state(mesh, 2), {'v': 2})
  assert ckpt.restore(abstract)[1] == {'v': 1}
  ckpt.save(5, make_state(mesh, 3), {'v': 3}, force=True)
  restored, meta = ckpt.restore(abstract)
  assert meta == {'v': 3} and ckpt.all_steps() == [5]
  assert_same(restored, make_state(mesh, 3), abstract)
  ckpt.close()


def test_errors(mesh, tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'empty'))
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    ckpt.restore(abstract_of(make_state(mesh)))
  with pytest.raises(TypeError):  # not JSON: fails in the caller, not in a background thread
    ckpt.save(1, make_state(mesh), {'bad': object()})
  ckpt.close()


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer('rel/ckpt')
  assert ckpt.directory == str(tmp_path / 'rel' / 'ckpt')
  ckpt.close()


_WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update('jax_num_cpu_devices', 4)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    port, process_id, directory = sys.argv[1:]
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(process_id))
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from trainer.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()), ('fsdp',))  # 2 processes x 4 devices
    value = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    w = jax.make_array_from_callback(value.shape, NamedSharding(mesh, P('fsdp')),
                                     lambda index: value[index])
    ckpt = Checkpointer(directory)
    ckpt.save(3, {'w': w}, {'processes': jax.process_count()})
    ckpt.close()
""")


def test_two_processes_save_one_restores(mesh, tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workers = [subprocess.Popen([sys.executable, '-c', _WORKER, str(port), str(i), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  for worker in workers:
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0, output[-3000:]
  # Each process wrote its own shards; one process with another device layout reads them all.
  ckpt = Checkpointer(str(tmp_path))
  abstract = {'w': jax.ShapeDtypeStruct((16, 8), jnp.float32,
                                        sharding=NamedSharding(mesh, P(None, 'fsdp')))}
  restored, meta = ckpt.restore(abstract)
  assert meta == {'processes': 2}
  np.testing.assert_array_equal(restored['w'], np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
  ckpt.close()


def test_save_error_keeps_the_os_reason_of_a_long_message():
  from trainer.checkpoint import _reason
  spec = '{"driver":"zarr",' + '"x":1,' * 100
  long = ValueError(f'Error writing "a/b": {spec} [os_error_code=27] File too large {spec}')
  line = _reason(long)
  assert line.startswith('File too large: Error writing') and ' ... ' in line and len(line) < 440
  assert _reason(OSError('No space left on device')) == 'No space left on device'
  assert _reason(OSError('write failed\nFile too large')) == 'File too large: write failed'
  assert _reason(RuntimeError('x' * 500)) == 'x' * 200 + ' ... ' + 'x' * 200   # no OS reason
