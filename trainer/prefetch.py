"""Batches put on the devices ahead of the step that takes them, by a background thread.

    with Prefetcher(host_batches, start, prepare, depth=2) as batches:
      for step in range(start, stop):
        batch = next(batches)          # waits only when the input falls behind the device

The thread takes host batches in order, runs `prepare(step, batch)` on each (the loop checks the
batch and starts its host-to-device copy there) and keeps up to `depth` of the results ready;
`next` hands them out in the same order, so the batch of step k is the one it always was. An
exception in the thread (a bad batch, a failing reader) is raised by the `next` that would have
returned that step's batch, after the batches before it. `close` (also on leaving the `with`,
whatever the reason) stops the thread and waits for it, however early the consumer stops.

`wait_s` is the time `next` spent blocked, summed: the time the device (whose steps are queued
asynchronously) may have been starved of input. depth=0 prepares each batch in `next` itself,
with no thread, for comparison.
"""
from __future__ import annotations

import collections
import threading
import time

from absl import logging

_POLL_S = 0.1      # how often a blocked side looks whether the other has stopped
_JOIN_S = 60.0     # how long close() waits for a producer busy inside a slow host batch


class Prefetcher:

  def __init__(self, batches, start: int, prepare, depth: int = 2):
    if depth < 0:
      raise ValueError(f'depth={depth} must be >= 0')
    self._batches, self._step, self._prepare, self.depth = iter(batches), start, prepare, depth
    self.wait_s = 0.0
    self._ready = collections.deque()         # (kind, value): 'batch', 'error' or 'end'
    self._filled = threading.Condition()      # signalled when _ready gains an item
    self._slots = threading.Semaphore(depth)  # one per batch prepared and not yet taken
    self._stop = threading.Event()
    self._done = False
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._produce, name='prefetch', daemon=True)
      self._thread.start()

  # ------------------------------------------------------------------ the background thread --
  def _produce(self):
    step = self._step
    try:
      while True:
        while not self._slots.acquire(timeout=_POLL_S):
          if self._stop.is_set():
            return
        if self._stop.is_set():
          return
        try:
          local = next(self._batches)
        except StopIteration:
          self._put('end', None)
          return
        self._put('batch', self._prepare(step, local))
        step += 1
    except BaseException as e:   # noqa: BLE001 -- handed to the consumer, which raises it
      self._put('error', e)

  def _put(self, kind, value):
    with self._filled:
      self._ready.append((kind, value))
      self._filled.notify()

  # ------------------------------------------------------------------ the consumer -----------
  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    start = time.perf_counter()
    try:
      if self._thread is None:
        kind, value = self._prepare_here()
      else:
        kind, value = self._take()
    finally:
      self.wait_s += time.perf_counter() - start
    if kind == 'batch':
      return value
    self._done = True
    if kind == 'end':
      raise StopIteration
    raise value

  def _prepare_here(self):
    try:
      local = next(self._batches)
      self._step += 1
      return 'batch', self._prepare(self._step - 1, local)
    except StopIteration:
      return 'end', None
    except BaseException as e:   # noqa: BLE001 -- raised by __next__, as from the thread
      return 'error', e

  def _take(self):
    with self._filled:
      while not self._ready:
        # a timeout, so that a producer that died without a word (it cannot, but) never hangs
        # the loop; a signal handler's KeyboardInterrupt interrupts the wait as well
        if not self._filled.wait(timeout=_POLL_S) and not self._thread.is_alive():
          if not self._ready:
            return 'error', RuntimeError('the prefetch thread ended without a batch')
      item = self._ready.popleft()
    self._slots.release()
    return item

  # ------------------------------------------------------------------ shutting down ----------
  def close(self):
    """Stops the thread and waits for it (it finishes the host batch it is preparing, if any).
    Batches not taken are dropped. Idempotent."""
    self._done = True
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=_JOIN_S)
      if self._thread.is_alive():
        logging.warning('the prefetch thread is still inside a host batch after %.0f s; '
                        'leaving it behind (a daemon thread)', _JOIN_S)
      self._thread = None
    self._ready.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
