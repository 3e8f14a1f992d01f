"""Random batches with just enough structure to learn, for tests, benchmarks and smoke runs.

Content is a function of (seed, train/eval, step, row in the global batch), so any process split
of a batch sees the same rows. Training streams never repeat; eval splits are `num_examples` long
(default 4 global batches).
"""

import numpy as np

from input import common


class _Synthetic(common.Source):

  def __init__(self, global_batch, seed=0, train=True, num_examples=None, process_index=None,
               process_count=None):
    super().__init__(global_batch, seed, train, process_index, process_count)
    self.num_examples = 4 * global_batch if num_examples is None else num_examples
    if self.num_examples <= 0:
      raise ValueError(f'num_examples must be positive, got {num_examples}')

  def _train_indices(self, step, positions):
    return positions  # Unused: rows are made from (step, row), not drawn from a finite split.

  def _rng(self, step: int, *row: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, common.CONTENT, int(self.train), step, *row])


class SyntheticImages(_Synthetic):
  """{'image': float32 [b, S, S, C] in [-1, 1], 'label': int32 [b]}: a fixed smooth pattern per
  class plus noise, so classifiers and generative models both have something to learn."""

  def __init__(self, global_batch, image_size, channels=3, num_classes=10, seed=0, train=True,
               num_examples=None, process_index=None, process_count=None):
    super().__init__(global_batch, seed, train, num_examples, process_index, process_count)
    self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
    # Plane waves with a random direction, frequency and phase per class and channel.
    rng = np.random.default_rng([seed, common.CONTENT, 2])
    freq = rng.uniform(0.5, 3, (num_classes, 1, 1, channels, 2))
    phase = rng.uniform(0, 2 * np.pi, (num_classes, 1, 1, channels))
    grid = np.stack(np.meshgrid(*2 * [np.linspace(0, 1, image_size)], indexing='ij'), -1)
    waves = (grid[:, :, None, :] * freq).sum(-1) * 2 * np.pi + phase
    self._prototypes = (0.6 * np.sin(waves)).astype(np.float32)  # [classes, S, S, C]

  def _examples(self, indices, step):
    del indices
    labels = self._rng(step).integers(self.num_classes, size=self.global_batch)[self.rows]
    shape = (self.image_size, self.image_size, self.channels)
    noise = np.stack([self._rng(step, row).standard_normal(shape, dtype=np.float32)
                      for row in self.rows])
    images = np.clip(self._prototypes[labels] + 0.25 * noise, -1, 1)
    return {'image': images.astype(np.float32), 'label': labels.astype(np.int32)}


class SyntheticTokens(_Synthetic):
  """{'tokens': int32 [b, seq_len + 1]}: each row counts up by a stride of 1-3 from a random start,
  modulo `min(vocab_size, active_vocab)`, so a model predicts every token after the second."""

  def __init__(self, global_batch, seq_len, vocab_size=50257, seed=0, train=True,
               num_examples=None, active_vocab=256, process_index=None, process_count=None):
    super().__init__(global_batch, seed, train, num_examples, process_index, process_count)
    self.seq_len, self.vocab_size = seq_len, vocab_size
    self.active_vocab = min(vocab_size, active_vocab)

  def _examples(self, indices, step):
    del indices
    rng = self._rng(step)
    start = rng.integers(self.active_vocab, size=self.global_batch)[self.rows]
    stride = rng.integers(1, 4, size=self.global_batch)[self.rows]
    tokens = (start[:, None] + stride[:, None] * np.arange(self.seq_len + 1)) % self.active_vocab
    return {'tokens': tokens.astype(np.int32)}
