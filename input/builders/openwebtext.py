"""OpenWebText as GPT-2 BPE tokens in blocks of 2048, stored in stream order.

Every HOLDOUT_EVERY-th document (i % HOLDOUT_EVERY == 0, counting from 0 in reading order) is
`validation`, the rest `train`: about 0.05% held out, as nanoGPT does. Each split is one stream
of its documents, each followed by EOT, cut into consecutive blocks of exactly BLOCK tokens; the
tail shorter than a block is dropped. Example k of a split is block k, so reading the split in
index order gives back the token stream.

Source: the Hugging Face hub dataset `Skylion007/openwebtext` (8,013,769 documents; the
`openwebtext` that nanoGPT's data/openwebtext/prepare.py loads), read with the `datasets`
library, or local files: one file or a directory of `.txt` (one document per file), `.jsonl` (a
'text' field per line) or `.parquet` (a 'text' column) files, read in sorted path order.
"""

import concurrent.futures
import json
import os
import pathlib
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from input import tokenizer

BLOCK = 2048
HOLDOUT_EVERY = 2000
HF_ID = 'Skylion007/openwebtext'
SUFFIXES = ('.txt', '.jsonl', '.parquet')
SPLITS = ('train', 'validation')

# tfds orders the examples of an unshuffled split by sorting their keys, spilling to 1000 on-disk
# buckets by the key's top bits (of 128) once a split passes 1 GB; a plain block index would land
# every block of OWT's 18 GB train split in bucket 0, which tfds then sorts in memory. Shifting
# the index up spreads up to 2**24 blocks (34B tokens) evenly over the buckets.
KEY_BITS = 24
# Documents handed to the tokenizer threads at a time: enough to keep them busy, few enough that
# memory stays flat.
_CHUNK = 512


def _documents_in_file(path: pathlib.Path) -> Iterator[str]:
  if path.suffix == '.txt':
    yield path.read_text(encoding='utf-8')
  elif path.suffix == '.jsonl':
    with path.open(encoding='utf-8') as f:
      for line_number, line in enumerate(f, 1):
        if line.strip():
          try:
            yield json.loads(line)['text']
          except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line_number}: not a JSON object with a 'text' field "
                             f'({e!r})') from e
  elif path.suffix == '.parquet':
    import pyarrow.parquet as pq  # only this format needs it
    parquet = pq.ParquetFile(path)
    if 'text' not in parquet.schema_arrow.names:
      raise ValueError(f"{path} has no 'text' column (columns: {parquet.schema_arrow.names})")
    for batch in parquet.iter_batches(batch_size=1024, columns=['text']):
      yield from batch.column(0).to_pylist()
  else:
    raise ValueError(f'{path}: documents must be in {"/".join(SUFFIXES)} files')


def source_files(source) -> list[pathlib.Path]:
  """The document files of a local source, in reading order."""
  root = pathlib.Path(source)
  if not root.exists():
    raise FileNotFoundError(f'OpenWebText source {root} does not exist')
  if root.is_file():
    return [root]
  files = sorted(p for p in root.rglob('*') if p.is_file() and p.suffix in SUFFIXES)
  if not files:
    raise FileNotFoundError(f'OpenWebText source {root} holds no {"/".join(SUFFIXES)} files')
  return files


def local_documents(source) -> Iterator[str]:
  """Every document of a local source, in reading order."""
  for path in source_files(source):
    yield from _documents_in_file(path)


def in_split(index: int, split: str, holdout_every: int = HOLDOUT_EVERY) -> bool:
  """Whether document `index` (0-based, in reading order) belongs to `split`."""
  return (index % holdout_every == 0) == (split == 'validation')


def _hub_documents(split: str, holdout_every: int) -> Iterator[str]:
  try:
    import datasets
  except ImportError as e:
    raise ImportError(f'Reading {HF_ID} from the Hugging Face hub needs the datasets library: '
                      'pip install datasets (or pass a local source)') from e
  docs = datasets.load_dataset(HF_ID, split='train')
  if split == 'validation':  # Spares reading 8M documents to keep 4k of them.
    docs = docs.select(range(0, len(docs), holdout_every))
    for batch in docs.iter(batch_size=1024):
      yield from batch['text']
    return
  index = 0
  for batch in docs.iter(batch_size=1024):
    for text in batch['text']:
      if in_split(index, split, holdout_every):
        yield text
      index += 1


def block_key(index: int) -> int:
  """The tfds key of block `index`: increasing with it, and spread over tfds's buckets."""
  if not 0 <= index < 1 << KEY_BITS:
    raise ValueError(f'block index {index} is outside [0, 2**{KEY_BITS}): raise KEY_BITS')
  return index << (128 - KEY_BITS)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def token_blocks(documents: Iterable[str], num_threads: int = 1,
                 totals: dict | None = None) -> Iterator[np.ndarray]:
  """uint16 [BLOCK] blocks of the stream of `documents`, each followed by EOT, tail dropped.

  `totals`, if given, gets the running counts of 'documents' and 'tokens' (tail included).
  Threads, not processes: tiktoken releases the GIL while it encodes (2 threads encode 1.8x as
  fast as 1 on 2 cores), and no text or tokens are copied between processes."""
  encoding = tokenizer.gpt2_encoding()
  totals = {} if totals is None else totals
  totals.update(documents=0, tokens=0)
  pending, length = [], 0  # arrays not yet cut into blocks, and their total length
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for chunk in _chunks(documents, _CHUNK):
      for tokens in pool.map(encoding.encode_ordinary, chunk):
        tokens.append(tokenizer.EOT)
        pending.append(np.asarray(tokens, np.uint16))
        length += len(tokens)
        totals['documents'] += 1
        totals['tokens'] += len(tokens)
        if length >= BLOCK:
          stream = np.concatenate(pending)
          full = len(stream) // BLOCK * BLOCK
          yield from stream[:full].reshape(-1, BLOCK)
          pending, length = [stream[full:]], len(stream) - full


class OpenWebText(tfds.core.GeneratorBasedBuilder):
  """OpenWebText as a stream of GPT-2 tokens in blocks of BLOCK, train and validation."""

  name = 'openwebtext'
  HF_ID = HF_ID
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': f'GPT-2 BPE tokens, EOT after each document, blocks of {BLOCK}; '
                            f'every {HOLDOUT_EVERY}th document held out for validation.'}

  def __init__(self, *, source=None, holdout_every: int = HOLDOUT_EVERY,
               num_threads: int | None = None, **kwargs):
    if holdout_every < 2:
      raise ValueError(f'holdout_every must be >= 2 to leave a train split, got {holdout_every}')
    if source is not None:
      source_files(source)  # a wrong path fails here, not after TensorFlow has loaded
    self._source = None if source is None else os.fspath(source)
    self._holdout_every = holdout_every
    self._num_threads = num_threads or os.cpu_count() or 1
    super().__init__(**kwargs)
    self._original_state.update(source=self._source, holdout_every=holdout_every)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # GPT-2 ids are < 2**16; BYTES stores them as 2 bytes each (the default would store
            # int64 protos) and reads back with np.frombuffer.
            'tokens': tfds.features.Tensor(shape=(BLOCK,), dtype=np.uint16,
                                           encoding=tfds.features.Encoding.BYTES),
        }),
        homepage='https://skylion007.github.io/OpenWebTextCorpus/',
        # Block k of a split must be example k: the stored split is the token stream in order.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(block=BLOCK, holdout_every=self._holdout_every,
                                        eot=tokenizer.EOT, tokenizer='gpt2'),
        citation="""@misc{Gokaslan2019OpenWeb,
  title={OpenWebText Corpus}, author={Aaron Gokaslan and Vanya Cohen},
  howpublished={\\url{http://Skylion007.github.io/OpenWebTextCorpus}}, year={2019}}""",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _documents(self, split: str) -> Iterator[str]:
    if self._source is None:
      return _hub_documents(split, self._holdout_every)
    return (text for i, text in enumerate(local_documents(self._source))
            if in_split(i, split, self._holdout_every))

  def _generate_examples(self, split):
    totals = {}
    index = -1
    for index, block in enumerate(token_blocks(self._documents(split), self._num_threads, totals)):
      yield block_key(index), {'tokens': block}
    if index < 0:
      raise ValueError(f'The {split} split has {totals["tokens"]} tokens from '
                       f'{totals["documents"]} documents, fewer than one block of {BLOCK}: give '
                       f'more documents (or a smaller holdout_every for validation)')
