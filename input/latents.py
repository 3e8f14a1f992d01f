"""Pre-encoded VAE latents: the ArrayRecord dataset tools/encode_latents.py writes, and its reader.

Encoding every image once, instead of in every training step, takes the VAE encoder out of the
step. What is stored is the posterior (mean and log-variance) of each image and of its mirror
image, so the reader picks a flip per row and the train step still draws a fresh posterior sample
with its own key: training sees the same distribution of latents as with in-step encoding.

Layout of a directory:
  latents.json                      shapes, splits and their files, the VAE's config
  <split>.array_record-NNNNN-of-MMMMM
One record per image: int32 label (little-endian), then float16 [2, h, w, 2c]: [original,
mirrored] x (mean, logvar) concatenated on the channel dim, the layout of `moments` in
models/vae.PretrainedVAE.prepare.
"""
from __future__ import annotations

import json
import os

import numpy as np

from input import common

META = 'latents.json'
DTYPE = np.float16          # halves the files; the posterior std of a latent is far above 1e-3


def record_shape(latent_size: int, latent_channels: int) -> tuple[int, ...]:
  return (2, latent_size, latent_size, 2 * latent_channels)


def encode_record(label: int, moments: np.ndarray) -> bytes:
  return np.int32(label).astype('<i4').tobytes() + np.asarray(moments, DTYPE).tobytes()


def decode_record(record: bytes, shape) -> tuple[int, np.ndarray]:
  label = int(np.frombuffer(record[:4], '<i4')[0])
  return label, np.frombuffer(record[4:], DTYPE).reshape(shape)


class LatentWriter:
  """Writes one split in `shards` files, records in the order given; `close` records the split
  in latents.json (merging with splits written before)."""

  def __init__(self, directory: str, split: str, latent_size: int, latent_channels: int,
               shards: int = 1, info: dict | None = None):
    from array_record.python.array_record_module import ArrayRecordWriter
    os.makedirs(directory, exist_ok=True)
    self.directory, self.split, self.info = directory, split, dict(info or {})
    self.shape = record_shape(latent_size, latent_channels)
    self.latent_size, self.latent_channels = latent_size, latent_channels
    self.files = [f'{split}.array_record-{i:05d}-of-{shards:05d}' for i in range(shards)]
    # group_size:1 keeps reads of single records cheap (random access, as Grain does)
    self._writers = [ArrayRecordWriter(os.path.join(directory, f), 'group_size:1')
                     for f in self.files]
    self.count = 0

  def write(self, label: int, moments: np.ndarray) -> None:
    if moments.shape != self.shape:
      raise ValueError(f'moments of shape {moments.shape}, expected {self.shape}')
    # round-robin over the shards: record i is record i // shards of shard i % shards
    self._writers[self.count % len(self._writers)].write(encode_record(label, moments))
    self.count += 1

  def close(self) -> None:
    for w in self._writers:
      w.close()
    path = os.path.join(self.directory, META)
    meta = {}
    if os.path.exists(path):
      with open(path) as f:
        meta = json.load(f)
    if meta and (meta['latent_size'], meta['latent_channels']) != (self.latent_size,
                                                                    self.latent_channels):
      raise ValueError(f'{path} holds {meta["latent_size"]}^2 x {meta["latent_channels"]} '
                       f'latents; this split has {self.latent_size}^2 x {self.latent_channels}')
    meta.update(self.info)
    meta.update(format=1, latent_size=self.latent_size, latent_channels=self.latent_channels,
                dtype=np.dtype(DTYPE).name)
    meta.setdefault('splits', {})[self.split] = {'num_examples': self.count, 'files': self.files}
    with open(path + '.tmp', 'w') as f:
      json.dump(meta, f, indent=2)
    os.replace(path + '.tmp', path)


def read_meta(directory: str) -> dict:
  path = os.path.join(os.path.expanduser(directory), META)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no pre-encoded latents in {directory} (no {META}); write them '
                            'with `python tools/encode_latents.py --out=' + str(directory) +
                            ' ...` (see its --help)')
  with open(path) as f:
    return json.load(f)


class LatentRecords(common.Source):
  """{'moments': float32 [b, h, w, 2c] (mean, logvar), 'label': int32 [b]}; in training each row
  takes the mirrored image's moments with probability 1/2 when `flip`."""

  def __init__(self, global_batch, directory, split='train', latent_size=None,
               latent_channels=None, train=True, flip=True, seed=0, process_index=None,
               process_count=None):
    super().__init__(global_batch, seed, train, process_index, process_count)
    meta = read_meta(directory)
    if split not in meta['splits']:
      raise FileNotFoundError(f'{directory} has latents of splits {sorted(meta["splits"])}, not '
                              f'{split!r}; encode it with `python tools/encode_latents.py '
                              f'--split={split} --out={directory} ...`')
    got = (meta['latent_size'], meta['latent_channels'])
    if None not in (latent_size, latent_channels) and got != (latent_size, latent_channels):
      raise ValueError(f'{directory} holds {got[0]}x{got[0]}x{got[1]} latents, but the '
                       f'experiment expects {latent_size}x{latent_size}x{latent_channels}')
    self.directory, self.split, self.flip = os.path.expanduser(directory), split, flip
    self.shape = record_shape(*got)
    info = meta['splits'][split]
    self.files = [os.path.join(self.directory, f) for f in info['files']]
    self.num_examples = int(info['num_examples'])
    # the writer dealt records round-robin: example i is record i // n of shard i % n, and the
    # data source numbers records shard after shard
    n = len(self.files)
    self._shard_start = np.cumsum([0] + [len(range(s, self.num_examples, n))
                                         for s in range(n - 1)])
    self.vae = meta.get('vae')
    self._source = None

  def _open(self):
    if self._source is None:   # opened lazily, so the source pickles into Grain's workers
      from array_record.python.array_record_data_source import ArrayRecordDataSource
      self._source = ArrayRecordDataSource(self.files)
    return self._source

  def __getstate__(self):
    return {**self.__dict__, '_source': None}

  def read(self, indices) -> list[tuple[int, np.ndarray]]:
    n = len(self.files)
    positions = [int(self._shard_start[i % n] + i // n) for i in np.asarray(indices)]
    return [decode_record(r, self.shape) for r in self._open().__getitems__(positions)]

  def _examples(self, indices, step):
    records = self.read(indices)
    if self.train and self.flip:
      rng = np.random.default_rng([self.seed, common.AUGMENT, step])
      mirrored = rng.random(self.global_batch)[self.rows] < 0.5
    else:
      mirrored = np.zeros(len(records), bool)
    moments = np.stack([m[int(f)] for (_, m), f in zip(records, mirrored)]).astype(np.float32)
    labels = np.array([label for label, _ in records], np.int32)
    return {'moments': moments, 'label': labels}
