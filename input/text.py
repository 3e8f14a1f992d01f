"""GPT-2 tokens from a prepared TFDS token dataset (openwebtext), in windows of seq_len + 1.

The builder (input/builders/openwebtext.py) stores each split as ONE token stream (documents
joined by end-of-text) cut into consecutive blocks of a fixed length, in stream order. Any window
length is then read by index without re-preparing: window i is stream[i L : i L + L + 1], which
spans at most ceil((L + 1) / block) + 1 blocks. Windows share their boundary token, as in
input/bible.py, so every token is predicted once per epoch.
"""
from __future__ import annotations

import numpy as np

from input import common
from input import records as records_lib
from input import tokenizer


class TokenRecords(common.Source):
  """{'tokens': int32 [b, seq_len + 1]}: windows shuffled per epoch when `train`, else in order."""

  vocab_size = tokenizer.VOCAB_SIZE

  def __init__(self, global_batch, seq_len, dataset='openwebtext', split='train', data_dir=None,
               train=True, workers=0, threads=2, seed=0, process_index=None, process_count=None):
    super().__init__(global_batch, seed, train, process_index, process_count)
    self.seq_len, self.workers, self.threads = seq_len, workers, threads
    self.records = records_lib.TFDSRecords(dataset, split, data_dir, raw_features=())
    shape = self.records.features['tokens'].shape
    if len(shape) != 1 or not shape[0]:
      raise ValueError(f'dataset {dataset!r}: tokens of shape {shape}, expected fixed-length '
                       f'blocks [n]; re-prepare it with {records_lib.BUILD_TOOL}')
    self.block = int(shape[0])
    stream = self.block * len(self.records)
    if not 1 <= seq_len < stream:
      raise ValueError(f'seq_len={seq_len} must be in [1, {stream}) for the {split} split of '
                       f'{dataset!r} ({stream} tokens)')
    self.num_examples = (stream - 1) // seq_len

  def _examples(self, indices, step):
    del step
    starts = np.asarray(indices, np.int64) * self.seq_len
    first = starts // self.block
    last = (starts + self.seq_len) // self.block            # inclusive
    needed = np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last)]))
    blocks = dict(zip(needed.tolist(), (np.asarray(r['tokens'], np.int32)
                                        for r in self.records.read(needed))))
    rows = []
    for start, a, b in zip(starts, first, last):
      span = np.concatenate([blocks[k] for k in range(a, b + 1)])
      offset = start - a * self.block
      rows.append(span[offset:offset + self.seq_len + 1])
    return {'tokens': np.stack(rows)}

  @staticmethod
  def decode(tokens) -> str:
    return tokenizer.gpt2_encoding().decode(np.asarray(tokens).ravel().tolist())
