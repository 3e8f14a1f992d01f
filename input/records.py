"""Random-access records for the real datasets: TFDS ArrayRecord splits and image folders.

TFDS prepares a dataset once into ArrayRecord files (`tools/build_dataset.py`); training reads
them by index through `tfds.builder_from_directory(...).as_data_source(split)`, which needs
neither TensorFlow nor the builder's code. Which examples a step reads is decided by
`input.common.Source` (a pure function of seed, step and the process's rows); Grain runs that
reading in threads or worker processes ahead of the step (`Source.iterate`).

A user's own images need no preparation: `FolderRecords` reads the `tfds.folder_dataset.
ImageFolder` layout, ROOT/<split>/<class>/<image>, with classes in sorted order.
"""
from __future__ import annotations

import os
import pathlib
import threading

BUILD_TOOL = 'python tools/build_dataset.py'
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')  # webp: LSUN's own export

# What to tell a user whose dataset is missing: where its raw files come from.
_SOURCES = {
    'imagenet2012': ('ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from '
                     'https://image-net.org/download-images) placed in a directory M'),
    'openwebtext': ('nothing when online (the Hugging Face hub dataset), or M = a directory of '
                    '.txt/.jsonl/.parquet files'),
    'celebahq256': ('nothing when online, or M = a folder M/<split>/<female|male>/*.jpg'),
    'celebahq64': ('nothing when online, or M = a folder M/<split>/<female|male>/*.jpg'),
    'lsun_church': ('nothing when online, or M = a folder of church images'),
}


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def prepare_hint(name: str, data_dir: str) -> str:
  source = _SOURCES.get(name)
  if source is None:
    return f'Prepare it with `{BUILD_TOOL} {name} --data_dir={data_dir}`'
  flag = ' --source=M' if source.startswith('ILSVRC') else ' [--source=M]'
  return (f'Prepare it with `{BUILD_TOOL} {name} --data_dir={data_dir}{flag}`, where you need '
          f'{source}')


def prepared_dir(name: str, data_dir: str | None = None) -> pathlib.Path:
  """The newest prepared version of `name` under data_dir: DATA_DIR/NAME[/CONFIG]/VERSION."""
  data_dir = str(data_dir or default_data_dir())
  root = pathlib.Path(data_dir) / name
  found = sorted((p.parent for p in root.glob('**/dataset_info.json')
                  if not any(part.startswith('incomplete') for part in p.parts)),
                 key=lambda p: _version_key(p.name))
  if not found:
    raise FileNotFoundError(f'dataset {name!r} is not prepared: no {root}/<version>/'
                            f'dataset_info.json. {prepare_hint(name, data_dir)}. DATA_DIR '
                            f'(default $TFDS_DATA_DIR or ~/tensorflow_datasets) says where to look.')
  return found[-1]


def _version_key(version: str) -> tuple:
  try:
    return tuple(int(x) for x in version.split('.'))
  except ValueError:
    return (-1,)


class TFDSRecords:
  """One split of a prepared TFDS dataset, read by index with the named features left encoded.

  Picklable (Grain's worker processes get a copy) and opened lazily in each process, under a
  lock: Grain's reader threads would otherwise import tfds concurrently, which deadlocks in its
  lazy imports (seen with 8 worker processes, once in about ten runs).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               raw_features: tuple[str, ...] = ('image',)):
    self.name, self.split = name, split
    self.directory = str(prepared_dir(name, data_dir))
    self.raw_features = raw_features
    self._source, self._lock = None, threading.Lock()
    import tensorflow_datasets as tfds  # needs no TensorFlow for reading
    self._builder = tfds.builder_from_directory(self.directory)
    info = self._builder.info
    if split not in info.splits:
      raise FileNotFoundError(f'dataset {name!r} in {self.directory} has no split {split!r} '
                              f'(it has {", ".join(sorted(info.splits))})')
    self.num_examples = info.splits[split].num_examples
    self.features = info.features

  def _open(self):
    with self._lock:
      if self._source is None:
        import tensorflow_datasets as tfds
        if self._builder is None:   # unpickled in a worker process
          self._builder = tfds.builder_from_directory(self.directory)
        decoders = {k: tfds.decode.SkipDecoding() for k in self.raw_features}
        self._source = self._builder.as_data_source(self.split, decoders=decoders)
      return self._source

  def __len__(self):
    return self.num_examples

  def read(self, indices) -> list[dict]:
    return list(self._open().__getitems__([int(i) for i in indices]))

  def class_names(self, feature: str = 'label') -> list[str]:
    return list(self.features[feature].names)

  def __getstate__(self):
    return {**self.__dict__, '_source': None, '_builder': None, '_lock': None, 'features': None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())


class FolderRecords:
  """ROOT/<split>/<class>/<image> (tfds.folder_dataset.ImageFolder's layout): labels are the
  positions of the class folders in sorted order; files are read in sorted order."""

  def __init__(self, root: str, split: str):
    base = pathlib.Path(root)
    if not base.is_dir():
      raise FileNotFoundError(f'IMAGE_FOLDER {root} is not a directory; it should hold '
                              f'<split>/<class>/<image> (e.g. {root}/train/cat/001.jpg)')
    splits = sorted(p.name for p in base.iterdir() if p.is_dir())
    if split not in splits:
      raise FileNotFoundError(f'IMAGE_FOLDER {root} has no split folder {split!r} (it has '
                              f'{", ".join(splits) or "none"}); the layout is '
                              f'<split>/<class>/<image>')
    self.root, self.split = str(base), split
    self.classes = sorted(p.name for p in (base / split).iterdir() if p.is_dir())
    self.paths, self.labels = [], []
    for label, name in enumerate(self.classes):
      files = sorted(p for p in (base / split / name).iterdir()
                     if p.suffix.lower() in IMAGE_SUFFIXES)
      self.paths += [str(p) for p in files]
      self.labels += [label] * len(files)
    if not self.paths:
      raise FileNotFoundError(f'IMAGE_FOLDER {root}/{split} holds no images '
                              f'({"/".join(IMAGE_SUFFIXES)}) in class folders')
    self.num_examples = len(self.paths)

  def __len__(self):
    return self.num_examples

  def read(self, indices) -> list[dict]:
    out = []
    for i in indices:
      with open(self.paths[int(i)], 'rb') as f:
        out.append({'image': f.read(), 'label': self.labels[int(i)]})
    return out

  def class_names(self, feature: str = 'label') -> list[str]:
    del feature
    return list(self.classes)
