"""Prepare a dataset as ArrayRecord files that the zoo's Grain pipelines read by index.

    python tools/build_dataset.py NAME --data_dir=DIR [--source=PATH]
    python tools/build_dataset.py openwebtext --data_dir=DIR --source=DOCS --holdout_every=4
    python tools/build_dataset.py --list

NAME is one of input/builders' datasets (openwebtext, celebahq256, celebahq64, lsun_church) or
imagenet2012 from tfds's catalog. --source is where the raw data is: local files for the former
(without it they are read from the Hugging Face hub, which needs `pip install datasets`), the
directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar for imagenet2012 (default:
DIR/downloads/manual). tools/standins.py writes small stand-ins of each in its real layout.

A dataset already prepared under DIR is not redone. At the end the dataset's directory (the one
holding dataset_info.json) and its number of examples per split are printed.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

flags.DEFINE_string('data_dir', None, 'TFDS data directory the dataset is written under.')
flags.DEFINE_string('source', None, 'Raw data: local files, or for imagenet2012 the directory '
                    'holding the ILSVRC2012 tars. Omit to read the Hugging Face hub.')
flags.DEFINE_integer('holdout_every', None, 'openwebtext only: every k-th document is validation '
                     '(default 2000, as nanoGPT; e.g. 4 for the 80 documents of the stand-in).')
flags.DEFINE_bool('list', False, 'Print the dataset names and exit.')
FLAGS = flags.FLAGS


class UsageError(Exception):
  """Printed as one line, exit status 2."""


def summary(data_dir: str) -> str:
  """'DIR: split=N split=N' for a prepared dataset directory."""
  import tensorflow_datasets as tfds
  splits = tfds.builder_from_directory(data_dir).info.splits
  counts = ' '.join(f'{name}={split.num_examples}' for name, split in splits.items())
  return f'{data_dir}: {counts}'


def main(argv):
  from input import builders
  if FLAGS.list:
    print('\n'.join(builders.names()))
    return
  if len(argv) != 2:
    raise UsageError(f'give one dataset name (one of {", ".join(builders.names())}); '
                     f'got {argv[1:] or "none"}')
  name = argv[1]
  builders.check_name(name)
  if not FLAGS.data_dir:
    raise UsageError('--data_dir is required')
  if FLAGS.source is not None and not os.path.exists(FLAGS.source):
    raise FileNotFoundError(f'--source {FLAGS.source} does not exist')
  kwargs = {}
  if FLAGS.holdout_every is not None:
    if name != 'openwebtext':
      raise UsageError('--holdout_every is for openwebtext only')
    kwargs['holdout_every'] = FLAGS.holdout_every
  if not FLAGS['verbosity'].present:  # tfds's INFO lines would bury the progress bars
    logging.set_verbosity(logging.WARNING)
  import tensorflow_datasets as tfds
  tfds.enable_progress_bar()
  written = builders.prepare(name, FLAGS.data_dir, FLAGS.source, **kwargs)
  print(f'wrote {summary(written)}')


def run_main(argv):
  """app.run's entry, turning the errors a user can fix into one line and a non-zero exit."""
  try:
    main(argv)
  except UsageError as e:
    print(f'build_dataset.py: error: {e}', file=sys.stderr)
    sys.exit(2)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'build_dataset.py: error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  app.run(run_main)
