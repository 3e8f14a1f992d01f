"""Input that never stalls the device: images travel as uint8 and are scaled on the device with the
values the host computed before, and a thread puts batches on the devices ahead, in order, with
its errors raised at the right step and a clean stop however the loop ends."""
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from input.fashion_mnist import FashionMNIST
from models.vit import ViT
from tasks.classification import Classification
from tasks.common import pixels_to_float, prepare_images
from trainer import state as state_lib
from trainer.prefetch import Prefetcher

ONE = dict(process_index=0, process_count=1)
host_float = lambda x: x.astype(np.float32) / 127.5 - 1   # what the sources computed before


# ----------------------------------------------------------------------------- uint8 images

def test_pixels_scale_on_the_device_to_the_hosts_values():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
  got = np.asarray(jax.jit(pixels_to_float)(pixels))
  assert got.dtype == np.float32 and got.min() == -1 and got.max() == 1
  np.testing.assert_array_equal(got, host_float(pixels))   # bit for bit, every value
  floats = np.linspace(-1, 1, 7, dtype=np.float32)
  assert pixels_to_float(floats) is floats
  batch = {'image': pixels, 'label': np.arange(16)}
  out = prepare_images(batch)
  assert out['label'] is batch['label'] and batch['image'].dtype == np.uint8   # not mutated
  tokens = {'tokens': np.zeros((2, 5), np.int32)}
  assert prepare_images(tokens) is tokens


class _DoublingCodec:
  """Stands in for the VAE: it must see the images already in [-1, 1]."""

  def prepare(self, params, batch, rng):
    del params, rng
    assert batch['image'].dtype == jnp.float32
    return {**batch, 'image': 2 * batch['image']}


@pytest.mark.parametrize('mixup, codec', [(0.0, None), (0.4, _DoublingCodec())])
def test_train_step_on_uint8_fashion_mnist_equals_host_floats(mixup, codec):
  batch = FashionMNIST(global_batch=8, **ONE).batch(3)
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (8, 28, 28, 1)
  floats = {**batch, 'image': host_float(batch['image'])}
  model = ViT(image_size=28, channels=1, patch=7, hidden=32, depth=1, heads=2, num_classes=10)
  task = Classification(num_classes=10, image_size=28, channels=1, mixup=mixup)
  tx = optax.adam(1e-3)
  init = state_lib.make_init_state(model, task, tx, ema_decay=0.0)
  state = state_lib.initialize(init, jax.random.key(0), None)
  step = jax.jit(state_lib.make_train_step(model, task, tx, lambda s: 1e-3, 0.0, codec))
  new_u8, metrics_u8 = step(state, batch)
  new_f32, metrics_f32 = step(state, floats)
  assert float(metrics_u8['loss']) == float(metrics_f32['loss'])
  jax.tree.map(np.testing.assert_array_equal, new_u8.params, new_f32.params)
  if mixup or codec:
    return
  eval_step = jax.jit(state_lib.make_eval_step(model, task, codec))
  masked = {**batch, 'mask': np.ones(8, np.float32)}
  jax.tree.map(np.testing.assert_array_equal, eval_step(state.params, masked),
               eval_step(state.params, {**masked, 'image': host_float(batch['image'])}))


# ----------------------------------------------------------------------------- the prefetcher

def _host(n, delay=0.0, fail_at=None):
  for i in range(n):
    time.sleep(delay)
    if i == fail_at:
      raise RuntimeError(f'reader broke at {i}')
    yield {'x': np.full((2,), i)}


def _threads():
  return [t for t in threading.enumerate() if t.name == 'prefetch']


@pytest.mark.parametrize('depth', [0, 1, 2, 5])
def test_order_steps_and_end(depth):
  seen = []
  prepare = lambda step, b: seen.append(step) or (step, int(b['x'][0]))
  with Prefetcher(_host(6), 10, prepare, depth) as batches:
    assert [next(batches) for _ in range(6)] == [(10 + i, i) for i in range(6)]
    with pytest.raises(StopIteration):
      next(batches)
    with pytest.raises(StopIteration):
      next(batches)
  assert seen == list(range(10, 16))
  assert not _threads()


def _eventually(condition, timeout=10.0):
  deadline = time.perf_counter() + timeout
  while not condition():
    assert time.perf_counter() < deadline, 'timed out'
    time.sleep(0.01)


def test_at_most_depth_batches_are_prepared_ahead():
  prepared = []
  with Prefetcher(_host(100), 0, lambda step, b: prepared.append(step) or step, 2) as batches:
    _eventually(lambda: len(prepared) == 2)
    time.sleep(0.2)
    assert prepared == [0, 1]
    assert next(batches) == 0
    _eventually(lambda: len(prepared) == 3)
    time.sleep(0.2)
    assert prepared == [0, 1, 2]


@pytest.mark.parametrize('depth', [0, 2])
def test_an_error_is_raised_at_its_step_after_the_batches_before_it(depth):
  def prepare(step, b):
    if step == 3:
      raise state_lib.TrainError(f'training batch {step}: token id 9 out of range')
    return step
  with Prefetcher(_host(10), 0, prepare, depth) as batches:
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(state_lib.TrainError, match='^training batch 3: token id'):
      next(batches)
    with pytest.raises(StopIteration):   # nothing after the error
      next(batches)
  with Prefetcher(_host(10, fail_at=2), 0, lambda step, b: step, depth) as batches:
    assert [next(batches) for _ in range(2)] == [0, 1]
    with pytest.raises(RuntimeError, match='reader broke at 2'):
      next(batches)
  assert not _threads()


def test_an_early_stop_never_deadlocks():
  # the producer is blocked on a full queue, inside a slow host batch, or has just started
  for delay, wait in ((0.0, 0.3), (0.5, 0.1), (0.0, 0.0)):
    batches = Prefetcher(_host(10**6, delay), 0, lambda step, b: step, 2)
    time.sleep(wait)
    start = time.perf_counter()
    batches.close()
    assert time.perf_counter() - start < 5 and not _threads()
    batches.close()   # idempotent
    with pytest.raises(StopIteration):
      next(batches)
  with pytest.raises(ZeroDivisionError):   # an exception in the loop's body
    with Prefetcher(_host(10**6), 0, lambda step, b: step, 2) as batches:
      next(batches)
      1 / 0
  assert not _threads()


def test_ctrl_c_while_waiting_for_a_batch_stops_cleanly():
  def interrupt(signum, frame):
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGALRM, interrupt)
  try:
    with pytest.raises(KeyboardInterrupt):
      with Prefetcher(_host(10, delay=1.0), 0, lambda step, b: step, 2) as batches:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        next(batches)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
  for _ in range(100):   # the producer finishes the slow batch it is inside, then stops
    if not _threads():
      break
    time.sleep(0.1)
  assert not _threads()


@pytest.mark.parametrize('depth', [0, 2])
def test_wait_time_counts_only_the_time_blocked(depth):
  gate, prepared = threading.Event(), []
  def prepare(step, b):
    if step == 1:
      gate.wait()      # the input of step 1 falls behind
    prepared.append(step)
    return step
  with Prefetcher(_host(3), 0, prepare, depth) as batches:
    if depth:
      _eventually(lambda: prepared == [0])
    next(batches)      # ready (depth 2), or prepared at once (depth 0): hardly any wait
    assert batches.wait_s < 0.1
    opened = []
    def open_gate():
      opened.append(time.perf_counter())
      gate.set()
    before = batches.wait_s
    threading.Timer(0.3, open_gate).start()
    called = time.perf_counter()
    next(batches)
    returned = time.perf_counter()
    blocked = batches.wait_s - before
    # Bounds from clocks read around the call, not the timer's nominal 0.3 s: the timer thread
    # starts its 0.3 s a little after `start()`, by a scheduler-dependent amount.
    assert opened[0] - called > 0.2
    assert opened[0] - called - 0.05 <= blocked <= returned - called


def test_device_batches_are_global_arrays_on_the_batch_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  source = FashionMNIST(global_batch=4, **ONE)
  with Prefetcher((source.batch(i) for i in range(3)), 0,
                  lambda step, b: state_lib.to_global(sharding, b, 4), 2) as batches:
    for i in range(3):
      b = next(batches)
      assert isinstance(b['image'], jax.Array) and b['image'].dtype == jnp.uint8
      assert b['image'].sharding == sharding
      np.testing.assert_array_equal(b['image'], source.batch(i)['image'])
