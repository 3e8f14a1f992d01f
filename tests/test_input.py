"""Data sources: shapes, determinism, process splits, eval coverage, and the real data's facts."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from input import bible, common, fashion_mnist, synthetic, tokenizer

ONE = dict(process_index=0, process_count=1)

SOURCES = {
    'synthetic_images': lambda **kw: synthetic.SyntheticImages(image_size=8, **kw),
    'synthetic_tokens': lambda **kw: synthetic.SyntheticTokens(seq_len=16, vocab_size=1000, **kw),
    'fashion_mnist': lambda **kw: fashion_mnist.FashionMNIST(image_size=32, **kw),
    'bible': lambda **kw: bible.Bible(seq_len=32, **kw),
}


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize('name', SOURCES)
@pytest.mark.parametrize('train', [True, False])
def test_deterministic_and_process_split(name, train):
  make = lambda **kw: SOURCES[name](global_batch=8, train=train, seed=3, **kw)
  whole = make(**ONE)
  assert (whole.global_batch, whole.local_batch) == (8, 8)
  assert_batches_equal(whole.batch(1), make(**ONE).batch(1))
  assert any(not np.array_equal(whole.batch(0)[k], whole.batch(1)[k]) for k in whole.batch(0))
  halves = [make(process_index=i, process_count=2) for i in range(2)]
  assert halves[0].local_batch == 4
  split = [h.batch(1) for h in halves]
  assert_batches_equal(whole.batch(1), {k: np.concatenate([s[k] for s in split]) for k in split[0]})
  assert ('mask' in whole.batch(0)) == (not train)


def test_process_rows():
  np.testing.assert_array_equal(common.process_rows(12, 2, 3), [8, 9, 10, 11])
  with pytest.raises(ValueError, match=r'(?s)global_batch=10.*process_count=4'):
    common.process_rows(10, 1, 4)
  with pytest.raises(ValueError, match=r'(?s)global_batch=10.*process_count=4'):
    synthetic.SyntheticTokens(global_batch=10, seq_len=4, process_index=0, process_count=4)
  # defaults come from JAX: one process here
  np.testing.assert_array_equal(common.process_rows(4), np.arange(4))


def test_assigned_rows_read_those_rows_of_the_global_batch():
  """A process whose devices hold rows {0, 1, 4, 5} of a batch of 8 (a mesh that interleaves
  hosts) reads exactly those rows of what one process reads whole."""
  for make in (lambda **kw: synthetic.SyntheticImages(global_batch=8, image_size=4, channels=1,
                                                      num_classes=3, **kw),
               lambda **kw: synthetic.SyntheticTokens(global_batch=8, seq_len=5, **kw)):
    whole = make(**ONE).batch(3)
    part = make(**ONE)
    part.assign_rows([0, 1, 4, 5])
    assert part.local_batch == 4
    assert_batches_equal(part.batch(3), {k: v[[0, 1, 4, 5]] for k, v in whole.items()})
  source = synthetic.SyntheticTokens(global_batch=8, seq_len=5, **ONE)
  for bad in ([1, 0], [0, 8], []):
    with pytest.raises(ValueError, match='ascending indices into a global batch of 8'):
      source.assign_rows(bad)


def test_train_epochs_are_permutations():
  source = common.Source(global_batch=4, **ONE)
  source.num_examples = 10
  seen = np.concatenate([source._train_indices(s, s * 4 + np.arange(4)) for s in range(5)])
  assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))  # 2 epochs, crossing a batch
  assert not np.array_equal(seen[:10], seen[10:])


def test_synthetic_shapes():
  images = synthetic.SyntheticImages(global_batch=4, image_size=6, channels=3, num_classes=5,
                                     **ONE).batch(0)
  assert images['image'].shape == (4, 6, 6, 3) and images['image'].dtype == np.float32
  assert images['image'].min() >= -1 and images['image'].max() <= 1
  assert images['label'].dtype == np.int32 and set(images['label']) <= set(range(5))
  tokens = synthetic.SyntheticTokens(global_batch=4, seq_len=10, vocab_size=100, **ONE).batch(0)
  assert tokens['tokens'].shape == (4, 11) and tokens['tokens'].dtype == np.int32
  assert 0 <= tokens['tokens'].min() and tokens['tokens'].max() < 100
  # Learnable: each row has a constant stride.
  strides = np.diff(tokens['tokens'].astype(np.int64), axis=1) % 100
  assert (strides == strides[:, :1]).all()


@pytest.mark.parametrize('n', [16, 13])
def test_synthetic_eval_covers_split_once(n):
  source = synthetic.SyntheticTokens(global_batch=8, seq_len=4, train=False, num_examples=n, **ONE)
  masks = [source.batch(i)['mask'] for i in range(source.num_eval_batches())]
  assert source.num_eval_batches() == -(-n // 8)
  assert all(m.dtype == np.float32 and m.shape == (8,) for m in masks)
  assert np.concatenate(masks).sum() == n and np.concatenate(masks)[:n].all()
  with pytest.raises(IndexError):
    source.batch(source.num_eval_batches())


# ----------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_raw_data():
  images, labels = fashion_mnist.load('train')
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert images.mean() == pytest.approx(72.94, abs=0.01)
  assert np.bincount(labels).tolist() == [6000] * 10
  assert fashion_mnist.load('test')[0].shape == (10000, 28, 28)


def test_fashion_mnist_batches():
  """Pixels travel as uint8 in [0, 255] (the train and eval steps scale them on the device)."""
  b = fashion_mnist.FashionMNIST(global_batch=16, **ONE).batch(0)
  assert b['image'].shape == (16, 28, 28, 1) and b['image'].dtype == np.uint8
  assert b['image'].min() == 0 and b['image'].max() == 255 and b['label'].dtype == np.int32
  padded = fashion_mnist.FashionMNIST(global_batch=16, image_size=32, **ONE).batch(0)['image']
  assert padded.dtype == np.uint8
  assert (padded[:, :2] == 0).all() and (padded[:, -2:] == 0).all()   # black, -1 once scaled
  assert (padded[:, :, :2] == 0).all() and (padded[:, :, -2:] == 0).all()
  np.testing.assert_array_equal(padded[:, 2:-2, 2:-2], b['image'])
  small = fashion_mnist.FashionMNIST(global_batch=16, image_size=14, **ONE).batch(0)['image']
  assert small.shape == (16, 14, 14, 1) and small.dtype == np.uint8
  for bad in (0, 2.5, '28'):
    with pytest.raises(ValueError):
      fashion_mnist.FashionMNIST(global_batch=16, image_size=bad, **ONE)


def test_fashion_mnist_flips_only_in_training():
  images = fashion_mnist.load('train')[0]
  kw = dict(global_batch=64, seed=0, **ONE)
  train = fashion_mnist.FashionMNIST(train=True, **kw)
  got = train.batch(2)['image'][..., 0]
  raw = images[train._train_indices(2, 2 * 64 + np.arange(64))]
  flipped = np.array([not np.array_equal(g, r) for g, r in zip(got, raw)])
  np.testing.assert_array_equal(got[flipped], raw[flipped][:, :, ::-1])
  assert 10 < flipped.sum() < 54
  ordered = fashion_mnist.FashionMNIST(train=False, **kw).batch(0)['image'][..., 0]
  np.testing.assert_array_equal(ordered, images[:64])


def test_fashion_mnist_shift_translates_each_training_row():
  """SHIFT: every training image is its flipped-or-not source moved by at most `shift` pixels,
  black filled (checked against a per-pixel loop), the moves differ from row to row and repeat
  for the same step, and shift=0 leaves the batches bit for bit as before."""
  kw = dict(global_batch=32, seed=3, **ONE)
  plain = fashion_mnist.FashionMNIST(train=True, **kw).batch(5)['image'][..., 0]
  moved_src = fashion_mnist.FashionMNIST(train=True, shift=2, **kw)
  moved = moved_src.batch(5)['image'][..., 0]
  np.testing.assert_array_equal(moved, moved_src.batch(5)['image'][..., 0])
  np.testing.assert_array_equal(plain, fashion_mnist.FashionMNIST(train=True, shift=0, **kw)
                                .batch(5)['image'][..., 0])
  found = []
  for got, src in zip(moved, plain):            # plain holds the same rows, flipped the same way
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        want = np.zeros_like(src)
        for i in range(28):
          for j in range(28):
            if 0 <= i - dy < 28 and 0 <= j - dx < 28:
              want[i, j] = src[i - dy, j - dx]
        if np.array_equal(got, want):
          found.append((dy, dx))
          break
      else:
        continue
      break
    else:
      raise AssertionError('a row is not a translation of its source by at most 2 pixels')
  assert len(set(found)) > 5                   # 25 possible moves over 32 rows
  with pytest.raises(ValueError, match='shift must be an int in'):
    fashion_mnist.FashionMNIST(train=True, shift=-1, **kw)


def test_random_erasing_draws_one_rectangle_per_chosen_row():
  rng = np.random.default_rng(0)
  where, noise = fashion_mnist.erasing(rng, 0.5, 400, 28, 28)
  assert where.shape == noise.shape == (400, 28, 28) and noise.dtype == np.uint8
  chosen = where.any((1, 2))
  assert 150 < chosen.sum() < 250                       # about half the rows, p = 0.5
  for w in where[chosen]:
    rows, cols = np.flatnonzero(w.any(1)), np.flatnonzero(w.any(0))
    h, wd = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert w.sum() == h * wd                             # one filled axis-aligned rectangle
    assert 0.02 * 784 - 6 <= h * wd <= 0.4 * 784 + 30    # 2-40% of the area, after rounding
    assert 0.2 <= h / wd <= 5                            # aspect 0.3-3.3, after rounding
  always = fashion_mnist.erasing(np.random.default_rng(1), 1.0, 50, 28, 28)[0]
  never = fashion_mnist.erasing(np.random.default_rng(1), 0.0, 50, 28, 28)[0]
  assert always.any((1, 2)).all() and not never.any()


def test_fashion_mnist_erase_changes_training_rows_inside_the_rectangle_only():
  kw = dict(global_batch=32, seed=3, **ONE)
  plain = fashion_mnist.FashionMNIST(train=True, **kw).batch(5)['image'][..., 0]
  erased_src = fashion_mnist.FashionMNIST(train=True, erase=1.0, **kw)
  erased = erased_src.batch(5)['image'][..., 0]
  np.testing.assert_array_equal(erased, erased_src.batch(5)['image'][..., 0])   # repeatable
  # the erasing draws come after the flips' from the step's generator: redrawn here, the
  # erased batch is the plain one with each row's rectangle replaced by its noise, exactly
  rng = erased_src._augment_rng(5)
  rng.random(32)                                         # the flips
  where, noise = fashion_mnist.erasing(rng, 1.0, 32, 28, 28)
  assert where.any((1, 2)).all()                         # every row erased at p = 1
  np.testing.assert_array_equal(erased, np.where(where, noise, plain))
  evaluated = fashion_mnist.FashionMNIST(train=False, erase=1.0, **kw).batch(0)['image']
  np.testing.assert_array_equal(
      evaluated, fashion_mnist.FashionMNIST(train=False, **kw).batch(0)['image'])
  for bad in (1.5, -0.1, True, '0.5'):
    with pytest.raises(ValueError, match='erase must be a probability'):
      fashion_mnist.FashionMNIST(train=True, erase=bad, **kw)


def test_fashion_mnist_eval_covers_test_split_once():
  source = fashion_mnist.FashionMNIST(global_batch=384, split='test', train=False, **ONE)
  assert source.num_eval_batches() == 27  # 10000 / 384 = 26.04
  labels, masks = zip(*((b['label'], b['mask']) for b in map(source.batch, range(27))))
  mask = np.concatenate(masks)
  assert mask.sum() == 10000 and mask[:10000].all()
  np.testing.assert_array_equal(np.concatenate(labels)[:10000], fashion_mnist.load('test')[1])


def test_fashion_mnist_missing_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(fashion_mnist, '_from_tfds', lambda split: None)
  expected = 'apt-get install dataset-fashion-mnist.*data_dir='
  with pytest.raises(FileNotFoundError, match=expected) as e:
    fashion_mnist.FashionMNIST(global_batch=8, data_dir=str(tmp_path), **ONE)
  assert '\n' not in str(e.value)


def test_imports_stay_light():
  # Training on synthetic or embedded data must work where TensorFlow is absent.
  code = ('import sys; import input.synthetic, input.fashion_mnist, input.bible, input.tokenizer; '
          'print(sorted({"tensorflow", "tensorflow_datasets", "jax"} & set(sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).parent.parent)
  assert out.stdout.strip() == '[]'


# ----------------------------------------------------------------------------- text

def test_tokenizer():
  enc = tokenizer.gpt2_encoding()
  assert enc.n_vocab == 50257 and enc.eot_token == tokenizer.EOT
  assert enc.encode('Hello world') == [15496, 995]
  text = 'In the beginning God created the heaven and the earth. 1234 \u2019 caf\u00e9\n\n'
  assert enc.decode(enc.encode(text)) == text
  from_dir = tokenizer.gpt2_encoding(str(tokenizer._default_dir()))
  assert from_dir.encode('Hello world') == [15496, 995]


def test_bible_split_is_by_chapter():
  names = [(book, n) for book, n, _ in bible.chapters()]
  assert len(names) == len(set(names)) == 1189
  assert names[0] == ('Genesis', 1) and names[-1] == ('Revelation', 22)
  train = {names[i] for i in range(1189) if bible.in_split(i, 'train')}
  test = {names[i] for i in range(1189) if bible.in_split(i, 'test')}
  assert not train & test and len(train | test) == 1189 and len(test) == 118
  total = len(bible.split_tokens('train')) + len(bible.split_tokens('test'))
  assert total == pytest.approx(1.03e6, rel=0.05)
  test_tokens = bible.split_tokens('test')
  assert (test_tokens == tokenizer.EOT).sum() == 118 and test_tokens[-1] == tokenizer.EOT
  assert bible.Bible.decode(test_tokens[:4]).startswith('Genesis 10\n')


def test_bible_windows_chain_and_cover_split():
  source = bible.Bible(global_batch=64, seq_len=128, split='test', train=False, **ONE)
  batches = [source.batch(i) for i in range(source.num_eval_batches())]
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  windows = np.concatenate([b['tokens'] for b in batches])[mask]
  assert windows.shape == (source.num_examples, 129) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])
  tokens = bible.split_tokens('test')
  np.testing.assert_array_equal(np.concatenate([windows[:, :-1].ravel(), windows[-1, -1:]]),
                                tokens[:len(windows) * 128 + 1])
  assert len(tokens) - (len(windows) * 128 + 1) < 128  # Only a partial last window is dropped.
