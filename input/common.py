"""What every source shares: which rows of a global batch this process owns, and which examples
a step reads.

A batch is a pure function of (seed, step, constructor args), so a resumed run reads exactly what
an uninterrupted one would have, with no iterator state to checkpoint. Training walks the split
in a fresh permutation per epoch (wrapping across epoch boundaries mid-batch); evaluation walks it
once in order and pads the last batch, marking real rows with `mask`.

`iterate(start, stop)` yields the same batches in order, prepared ahead of the consumer by Grain:
in threads (`threads`, which overlap image decoding since PIL releases the GIL) and, with
`workers` > 0, in that many worker processes. Because every batch is a pure function of its
step, how many threads or processes prepare them changes nothing in what they hold.
"""

import functools
import operator

import numpy as np

# Streams drawn from the seed; distinct tags keep them independent of each other.
SHUFFLE, AUGMENT, CONTENT = 0, 1, 2


def process_split(process_index=None, process_count=None) -> tuple[int, int]:
  """(index, count) of this process, defaulting to what JAX reports."""
  if process_index is None or process_count is None:
    import jax  # Lazily, so that data code and its tests run without initialising a backend.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside [0, process_count={process_count})')
  return process_index, process_count


def process_rows(global_batch: int, process_index=None, process_count=None) -> np.ndarray:
  """The rows of each global batch that this process loads by default: its contiguous share.
  The training loop replaces them with the rows its batch sharding places on this process's
  devices (`Source.assign_rows`), which differ where a mesh replicates the batch across hosts."""
  process_index, process_count = process_split(process_index, process_count)
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'global_batch={global_batch} must be a positive multiple of '
                     f'process_count={process_count}')
  local = global_batch // process_count
  return np.arange(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=8)
def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, SHUFFLE, epoch]).permutation(n)
  perm.flags.writeable = False  # Shared through the cache.
  return perm


def _copy_out(batch: dict) -> dict:
  return {k: np.array(v) for k, v in batch.items()}


class _Batches:
  """What `iterate` returns: closing it stops Grain's threads and worker processes, and waits for
  Grain's background unlinking of the shared memory that workers handed over (an exit before
  that is done leaves blocks for the resource tracker, which cleans them up but warns about
  each)."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def close(self):
    self._iterator.close()
    try:  # Grain has no public hook for this; without one, the warning is all that is lost.
      from grain._src.python.ipc.shared_memory_array import SharedMemoryArray as shm
      pool = shm._del_thread_pool
      if pool is not None:
        pool.close()
        pool.join()
        with shm._lock:  # later frees (none are expected) unlink at once
          shm._del_thread_pool = shm._outstanding_del_requests = None
    except (ImportError, AttributeError):
      pass


class Source:
  """Base of the finite sources: subclasses set `num_examples` and implement `_examples`."""

  num_examples: int

  workers = 0      # Grain worker processes preparing batches ahead (0: this process only)
  threads = 1      # threads per process preparing batches ahead
  prefetch = 2     # batches prepared ahead of the consumer, per process

  def __init__(self, global_batch, seed=0, train=True, process_index=None, process_count=None):
    self.global_batch = global_batch
    self.assign_rows(process_rows(global_batch, process_index, process_count))
    self.seed = seed
    self.train = train

  def assign_rows(self, rows) -> None:
    """Load these rows (indices into each global batch, ascending) from now on."""
    rows = np.asarray(rows, dtype=np.int64)
    if (rows.ndim != 1 or not len(rows) or np.any(np.diff(rows) <= 0) or rows[0] < 0
        or rows[-1] >= self.global_batch):
      raise ValueError(f'rows must be ascending indices into a global batch of '
                       f'{self.global_batch}, got {rows}')
    rows.flags.writeable = False
    self.rows = rows
    self.local_batch = len(rows)

  def num_eval_batches(self) -> int:
    """Batches that cover the split exactly once (the last one padded)."""
    return -(-self.num_examples // self.global_batch)

  def indices(self, step: int) -> np.ndarray:
    """The examples this process's rows of global batch `step` read (eval: padding repeats the
    last example)."""
    step = operator.index(step)
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    positions = self._positions(step)
    if self.train:
      return self._train_indices(step, positions)
    if step >= self.num_eval_batches():
      raise IndexError(f'eval batch {step} is past the last one ({self.num_eval_batches() - 1})')
    return np.minimum(positions, self.num_examples - 1)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`; eval batches carry a float32 `mask`."""
    out = self._examples(self.indices(step), operator.index(step))
    if not self.train:
      out['mask'] = (self._positions(step) < self.num_examples).astype(np.float32)
    return out

  def iterate(self, start: int, stop: int):
    """Batches start .. stop - 1 in order, prepared ahead by Grain (see the module docstring)."""
    import grain  # Lazily: indexing a source needs no Grain.
    dataset = grain.MapDataset.range(start, stop).map(self.batch)
    threads = max(1, self.threads)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(self.prefetch, threads)))
    if self.workers > 0:
      from absl import flags
      if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app
        flags.FLAGS.mark_as_parsed()   # (a library user, a test) their defaults are what we want
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=self.prefetch))
      # Workers hand batches over in shared memory that is unlinked when the array is freed;
      # a copy frees it at once instead of whenever the consumer lets go (or at exit, where the
      # resource tracker would warn about every block still open).
      dataset = dataset.map(_copy_out)
    return _Batches(iter(dataset))

  def _positions(self, step: int) -> np.ndarray:
    return step * self.global_batch + self.rows

  def _train_indices(self, step: int, positions: np.ndarray) -> np.ndarray:
    del step
    epochs, offsets = np.divmod(positions, self.num_examples)
    indices = np.empty_like(positions)
    # A batch spans at most a few epochs (more only if the batch exceeds the split).
    for epoch in np.unique(epochs):
      at = epochs == epoch
      indices[at] = permutation(self.num_examples, self.seed, int(epoch))[offsets[at]]
    return indices

  def _augment_rng(self, step: int) -> np.random.Generator:
    """Randomness for augmentation: draw for the GLOBAL batch, then slice with `self.rows`, so the
    process split does not change what a row gets."""
    return np.random.default_rng([self.seed, AUGMENT, step])

  def _examples(self, indices: np.ndarray, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError
