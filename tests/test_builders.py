"""input/builders and tools/build_dataset.py on the stand-ins of tools/standins.py: each dataset is
prepared once from its real raw layout, then read back by index as training reads it."""
import io
import os
import subprocess
import sys
import tarfile
import textwrap
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import shuffle

from input import builders, tokenizer
from input.builders import celebahq, lsun_church, openwebtext
from tools import standins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, 'tools', 'build_dataset.py')
HOLDOUT = 4
EOT_TEXT = '<|endoftext|>'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Every dataset prepared from its stand-in (a few seconds; imagenet2012 loads TensorFlow)."""
  root = tmp_path_factory.mktemp('builders')
  raw, data_dir = root / 'raw', root / 'tfds'
  out = {'raw': raw, 'data_dir': data_dir, 'dirs': {}}
  out['ilsvrc'] = standins.ilsvrc_tars(raw / 'ilsvrc')
  out['celebahq'] = standins.celebahq_folder(raw / 'celebahq')
  out['lsun'] = standins.lsun_folder(raw / 'lsun')
  for name, src in [('imagenet2012', 'ilsvrc'), ('celebahq256', 'celebahq'),
                    ('celebahq64', 'celebahq'), ('lsun_church', 'lsun')]:
    out['dirs'][name] = builders.prepare(name, data_dir, raw / src)
  # One OWT per source format, each in its own data_dir (same name and version). The parquet one
  # is prepared as if it were over tfds's 1 GB in-memory limit, so its blocks go through tfds's
  # on-disk buckets, the path the real 18 GB train split takes.
  for kind in ('jsonl', 'txt', 'parquet'):
    out[f'docs_{kind}'] = standins.owt_files(raw / f'owt_{kind}', kind=kind)
    limit = 0 if kind == 'parquet' else shuffle.MAX_MEM_BUFFER_SIZE
    with mock.patch.object(shuffle, 'MAX_MEM_BUFFER_SIZE', limit):
      out['dirs'][f'owt_{kind}'] = builders.prepare(
          'openwebtext', root / f'tfds_{kind}', raw / f'owt_{kind}', holdout_every=HOLDOUT)
  return out


def source(data, name, split, **kw):
  return tfds.builder_from_directory(data['dirs'][name]).as_data_source(split, **kw)


def read(directory, split, **kw) -> list[dict]:
  """Every example of a prepared split, in index order."""
  src = tfds.builder_from_directory(directory).as_data_source(split, **kw)
  return [src[i] for i in range(len(src))]


def examples(data, name, split, **kw):
  return read(data['dirs'][name], split, **kw)


# ---- the registry and its errors -----------------------------------------------------------------

def test_names_and_builders():
  assert set(builders.BUILDERS) == {'openwebtext', 'celebahq256', 'celebahq64', 'lsun_church'}
  assert builders.names() == [*builders.BUILDERS, 'imagenet2012']
  for name, cls in builders.BUILDERS.items():
    assert cls.name == name and str(cls.VERSION) == '1.0.0' and '1.0.0' in cls.RELEASE_NOTES
  with pytest.raises(ValueError, match=r"'celebaq64' \(did you mean celebahq64.*known: openwebt"):
    builders.make_builder('celebaq64', '/tmp')


def test_make_builder_writes_array_record(tmp_path):
  for name in builders.names():
    builder = builders.make_builder(name, tmp_path)
    assert builder.info.file_format.value == 'array_record', name
    assert builder.data_dir.startswith(str(tmp_path / name)), name


def test_missing_sources_fail_before_writing(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope does not exist'):
    builders.prepare('celebahq64', tmp_path, tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    openwebtext.OpenWebText(data_dir=tmp_path, source=tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar and ILSVRC2012_img_val'):
    builders.prepare('imagenet2012', tmp_path, tmp_path)
  with mock.patch.dict(sys.modules, {'datasets': None}):  # as where it is not installed
    for name, hub_id in [('openwebtext', 'Skylion007/openwebtext'),
                         ('celebahq256', 'korexyz/celeba-hq-256x256'),
                         ('lsun_church', 'tglcourse/lsun_church_train')]:
      with pytest.raises(ImportError, match=f'{hub_id}.*pip install datasets'):
        builders.prepare(name, tmp_path)
  assert not list(tmp_path.iterdir())


# ---- images --------------------------------------------------------------------------------------

def test_image_datasets_schema_and_sizes(data):
  sizes = {'imagenet2012': {'train': 12, 'validation': 6},
           'celebahq256': {'train': 6, 'validation': 6},
           'celebahq64': {'train': 6, 'validation': 6},
           'lsun_church': {'train': 5}}
  for name, want in sizes.items():
    info = tfds.builder_from_directory(data['dirs'][name]).info
    assert {s: info.splits[s].num_examples for s in info.splits} == want, name
    assert os.path.isfile(os.path.join(data['dirs'][name], 'dataset_info.json'))
  for name, size, fmt in [('celebahq256', 256, 'jpeg'), ('celebahq64', 64, 'png'),
                          ('lsun_church', 256, 'jpeg')]:
    features = tfds.builder_from_directory(data['dirs'][name]).info.features
    assert features['image'].shape == (size, size, 3) and features['image'].dtype == np.uint8
    assert features['image'].encoding_format == fmt
    want_names = ['female', 'male'] if name.startswith('celebahq') else ['0']
    assert features['label'].names == want_names


def _source_arrays(paths, size, resample):
  out = []
  for path in paths:
    with Image.open(path) as image:
      out.append(np.asarray(celebahq.square_resize(image, size, resample)))
  return out


@pytest.mark.parametrize('name,size', [('celebahq256', 256), ('celebahq64', 64)])
def test_celebahq_images_follow_their_labels(data, name, size):
  for split in ('train', 'validation'):
    got = examples(data, name, split)
    labels = [ex['label'] for ex in got]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    for ex in got:
      image = ex['image']
      assert image.shape == (size, size, 3) and image.dtype == np.uint8
      red, blue = image[..., 0].mean(), image[..., 2].mean()
      assert (red > blue + 30) == (ex['label'] == 0), 'female stand-ins are red, male blue'
    # every stored image is its source cropped and resized: PNG exactly, JPEG q95 within its loss
    for label, paths in data['celebahq'][split].items():
      refs = _source_arrays(paths, size, None)
      mine = [ex['image'] for ex in got if ex['label'] == celebahq.LABELS.index(label)]
      err = np.array([[np.abs(m.astype(int) - r).mean() for r in refs] for m in mine])
      assert sorted(err.argmin(1)) == [0, 1, 2]
      assert err.min(1).max() == 0 if name == 'celebahq64' else err.min(1).max() < 4


def test_celebahq256_keeps_jpegs_already_at_size(data):
  stored = {ex['image'] for ex in examples(data, 'celebahq256', 'train',
                                           decoders={'image': tfds.decode.SkipDecoding()})}
  kept = [p for paths in data['celebahq']['train'].values() for p in paths
          if p.suffix == '.jpg' and Image.open(p).size == (256, 256)]
  assert len(kept) == 2 and all(p.read_bytes() in stored for p in kept)
  assert all(Image.open(io.BytesIO(b)).format == 'JPEG' for b in stored)


def test_lsun_is_center_cropped_and_unconditional(data):
  got = examples(data, 'lsun_church', 'train')
  refs = _source_arrays(data['lsun'], 256, Image.Resampling.BOX)
  for ex in got:
    image = ex['image']
    assert image.shape == (256, 256, 3) and ex['label'] == 0
    # Outside their centred square the stand-ins are pure red: a squash would show it along two
    # edges, a centre crop leaves none (past the 2 pixels the lossy sources smear it into).
    edges = [image[:, 2:8], image[:, -8:-2], image[2:8], image[-8:-2]]
    assert max(e[..., 0].mean() for e in edges) < 40 and image[..., 0].mean() < 30
    assert min(np.abs(image.astype(int) - r).mean() for r in refs) < 4  # JPEG q95 loss


def test_imagenet_labels_from_the_tars(data):
  facts = data['ilsvrc']
  train = examples(data, 'imagenet2012', 'train')
  assert {ex['file_name'].decode(): ex['label'] for ex in train} == facts['train_files']
  val = examples(data, 'imagenet2012', 'validation')
  want = dict(zip(sorted(facts['val_files']), facts['val_label_ids']))
  assert {ex['file_name'].decode(): ex['label'] for ex in val} == want
  assert facts['val_labels'][:2] == ['n01751748', 'n09193705']
  for ex in train + val:
    assert ex['image'].ndim == 3 and ex['image'].shape[2] == 3 and ex['image'].dtype == np.uint8
  by_name = {ex['file_name'].decode(): ex['image'] for ex in train}
  first = facts['synsets'][0]
  portrait, grey = by_name[f'{first}_1.JPEG'], by_name[f'{first}_2.JPEG']
  assert portrait.shape[0] > portrait.shape[1]
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


# ---- OpenWebText ---------------------------------------------------------------------------------

def split_docs(docs, split):
  return [d for i, d in enumerate(docs) if openwebtext.in_split(i, split, HOLDOUT)]


def stored_stream(data, kind, split):
  blocks = examples(data, f'owt_{kind}', split)
  return np.concatenate([b['tokens'] for b in blocks]) if blocks else np.zeros(0, np.uint16)


def test_openwebtext_schema(tmp_path):
  features = openwebtext.OpenWebText(data_dir=tmp_path).info.features
  assert features['tokens'].shape == (openwebtext.BLOCK,) == (2048,)
  assert features['tokens'].dtype == np.uint16
  assert features['tokens'].to_json_content().encoding == 'bytes'  # 2 bytes a token on disk


@pytest.mark.parametrize('kind', ['jsonl', 'txt', 'parquet'])
@pytest.mark.parametrize('split', ['train', 'validation'])
def test_openwebtext_is_the_token_stream_in_order(data, kind, split):
  builder = tfds.builder_from_directory(data['dirs'][f'owt_{kind}'])
  assert builder.info.disable_shuffling and builder.info.metadata['holdout_every'] == HOLDOUT
  encoding = tokenizer.gpt2_encoding()
  docs = split_docs(data[f'docs_{kind}'], split)
  want = np.concatenate([encoding.encode_ordinary(d) + [tokenizer.EOT] for d in docs])
  src = source(data, f'owt_{kind}', split)
  assert len(src) == len(want) // 2048 >= (1 if split == 'validation' else 5)
  for k in range(len(src)):  # block k on disk is stream[k B : (k + 1) B]
    block = src[k]['tokens']
    assert block.dtype == np.uint16 and block.shape == (2048,)
    np.testing.assert_array_equal(block, want[k * 2048:(k + 1) * 2048])
  stream = stored_stream(data, kind, split)
  assert stream.max() == tokenizer.EOT > 2**15  # ids above int16 survive the uint16 bytes
  text = encoding.decode_bytes(stream.tolist())
  assert (EOT_TEXT.join(docs) + EOT_TEXT).encode().startswith(text)


def test_openwebtext_formats_agree_and_splits_are_disjoint(data):
  assert data['docs_jsonl'] == data['docs_txt'] == data['docs_parquet']
  for split in ('train', 'validation'):
    ref = stored_stream(data, 'jsonl', split)
    for kind in ('txt', 'parquet'):
      np.testing.assert_array_equal(stored_stream(data, kind, split), ref)
  encoding = tokenizer.gpt2_encoding()
  pieces = {split: encoding.decode(stored_stream(data, 'jsonl', split).tolist()).split(EOT_TEXT)
            for split in ('train', 'validation')}
  # all but the last, cut, piece of each split are whole documents of that split and no other
  for split, other in [('train', 'validation'), ('validation', 'train')]:
    whole = pieces[split][:-1]
    assert len(whole) >= 2 and set(whole) <= set(split_docs(data['docs_jsonl'], split))
    assert not set(whole) & set(split_docs(data['docs_jsonl'], other))


def test_openwebtext_block_keys_keep_order_and_spread():
  keys = [openwebtext.block_key(i) for i in (0, 1, 2, 2**23, 2**24 - 1)]
  assert keys == sorted(keys) and keys[-1] < 2**128
  buckets = [shuffle.get_bucket_number(k, shuffle.BUCKETS_NUMBER) for k in keys]
  assert buckets == [0, 0, 0, 500, 999]
  with pytest.raises(ValueError, match='raise KEY_BITS'):
    openwebtext.block_key(2**24)


def test_openwebtext_short_split_fails_naming_it(data, tmp_path):
  with pytest.raises(ValueError, match=r'validation split has \d+ tokens from 1 documents'):
    builders.prepare('openwebtext', tmp_path, data['raw'] / 'owt_jsonl', holdout_every=1000)


# ---- the hub path, with a fake of the few parts of `datasets` the builders use -------------------

class FakeDataset:

  def __init__(self, rows, label_names=None):
    self.rows, self.label_names = rows, label_names

  @property
  def features(self):
    return {'label': mock.Mock(names=self.label_names)}

  def cast_column(self, column, feature):
    assert column == 'image' and feature.decode is False  # the builders want encoded bytes
    return self

  def __len__(self):
    return len(self.rows)

  def __iter__(self):
    return iter(self.rows)

  def select(self, indices):
    return FakeDataset([self.rows[i] for i in indices], self.label_names)

  def iter(self, batch_size):
    for start in range(0, len(self.rows), batch_size):
      batch = self.rows[start:start + batch_size]
      yield {k: [row[k] for row in batch] for k in batch[0]}


def fake_datasets(tables):
  """A `datasets` module whose load_dataset(hf_id, split) serves tables[hf_id][split]."""
  module = mock.Mock(spec=['load_dataset', 'Image'])
  module.load_dataset = lambda hf_id, split: tables[hf_id][split]
  module.Image = lambda decode=True: mock.Mock(decode=decode)
  return module


def test_hub_paths_with_a_fake_datasets(data, tmp_path):
  def rows(paths, label):
    return [{'image': {'bytes': p.read_bytes(), 'path': None}, 'label': label} for p in paths]
  faces = data['celebahq']
  # the hub's class order reversed: labels must follow the names, not the numbers
  celeba = {split: FakeDataset(rows(faces[split]['male'], 0) + rows(faces[split]['female'], 1),
                               label_names=['male', 'female'])
            for split in ('train', 'validation')}
  churches = {'train': FakeDataset(rows(data['lsun'][:3], 7)),
              'test': FakeDataset(rows(data['lsun'][3:], 7))}
  docs = data['docs_jsonl']
  owt = {'train': FakeDataset([{'text': d} for d in docs])}
  hub = fake_datasets({celebahq.HF_ID: celeba, lsun_church.HF_ID: churches,
                       openwebtext.HF_ID: owt})
  with mock.patch.dict(sys.modules, {'datasets': hub}):
    face_dir = builders.prepare('celebahq64', tmp_path)
    church_dir = builders.prepare('lsun_church', tmp_path)
    owt_dir = builders.prepare('openwebtext', tmp_path, holdout_every=HOLDOUT)
  for split in ('train', 'validation'):
    for ex in read(face_dir, split):
      female = ex['image'][..., 0].mean() > ex['image'][..., 2].mean()
      assert ex['label'] == (0 if female else 1)
  splits = tfds.builder_from_directory(church_dir).info.splits
  assert {s: splits[s].num_examples for s in splits} == {'train': 3, 'validation': 2}
  for split in ('train', 'validation'):
    np.testing.assert_array_equal(np.concatenate([ex['tokens'] for ex in read(owt_dir, split)]),
                                  stored_stream(data, 'jsonl', split))


# ---- stand-ins -----------------------------------------------------------------------------------

def test_standins_are_deterministic_and_in_layout(tmp_path):
  a = standins.image_folder(tmp_path / 'a', seed=3)
  b = standins.image_folder(tmp_path / 'b', seed=3)
  assert sorted(a) == ['test', 'train'] and sorted(a['train']) == ['cat', 'dog']
  pa = [p for s in a.values() for ps in s.values() for p in ps]
  pb = [p for s in b.values() for ps in s.values() for p in ps]
  assert [p.read_bytes() for p in pa] == [p.read_bytes() for p in pb]
  assert {p.suffix for p in pa} == {'.jpg', '.png'}
  assert all(p.relative_to(tmp_path / 'a').parts[:2] in
             {(s, c) for s in ('train', 'test') for c in ('cat', 'dog')} for p in pa)
  for copy in ('a', 'b'):
    standins.ilsvrc_tars(tmp_path / copy, num_classes=2, per_class=2, num_val=3, seed=5)
  for tar_name in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'):
    assert (tmp_path / 'a' / tar_name).read_bytes() == (tmp_path / 'b' / tar_name).read_bytes()
  with tarfile.open(tmp_path / 'a' / 'ILSVRC2012_img_val.tar') as tar:
    assert tar.getnames() == [f'ILSVRC2012_val_0000000{k}.JPEG' for k in (1, 2, 3)]
    for member in tar.getmembers():
      data = tar.extractfile(member).read()
      with Image.open(io.BytesIO(data)) as image:
        assert image.format == 'JPEG' and min(image.size) >= 300 and image.mode == 'RGB'
      assert 40_000 < len(data) < 200_000, 'ImageNet-like file sizes'


# ---- the tool ------------------------------------------------------------------------------------

def run_tool(*args, cwd=ROOT):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}, timeout=120)


def test_tool_builds_and_reports(data, tmp_path):
  out = run_tool('celebahq64', f'--data_dir={tmp_path}', f'--source={data["raw"] / "celebahq"}')
  assert out.returncode == 0, out.stderr
  written = tmp_path / 'celebahq64' / '1.0.0'
  assert out.stdout.strip().splitlines()[-1] == f'wrote {written}: train=6 validation=6'
  files = sorted(p.name for p in written.iterdir())
  assert 'dataset_info.json' in files and 'features.json' in files
  assert 'celebahq64-train.array_record-00000-of-00001' in files
  assert 'Generating' in out.stderr  # tfds's progress bars are on
  listed = run_tool('--list')
  assert listed.returncode == 0 and listed.stdout.split() == builders.names()


@pytest.mark.parametrize('args,message', [
    (['celebaq64'], "unknown dataset 'celebaq64' (did you mean celebahq64"),
    (['celebahq64', '--source=/no/such/dir'], '--source /no/such/dir does not exist'),
    (['imagenet2012'], 'lacks ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'),
])
def test_tool_fails_with_one_line(tmp_path, args, message):
  out = run_tool(*args, f'--data_dir={tmp_path}')
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('build_dataset.py: error:'), out.stderr
  assert message in lines[0]
  assert not list(tmp_path.iterdir())


# ---- reading where TensorFlow is absent ----------------------------------------------------------

NO_TENSORFLOW = textwrap.dedent('''
    import sys

    class Hidden:
      """Wraps a meta path finder so that tensorflow cannot be found, as if not installed.
      (sys.modules['tensorflow'] = None is no stand-in: tfds then takes TensorFlow as loaded.)"""
      def __init__(self, finder):
        self.finder = finder
      def find_spec(self, name, path=None, target=None):
        if name == 'tensorflow' or name.startswith('tensorflow.'):
          return None
        return self.finder.find_spec(name, path, target)
      def invalidate_caches(self):
        getattr(self.finder, 'invalidate_caches', lambda: None)()

    sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
    ''')


def test_reading_needs_no_tensorflow(data):
  script = NO_TENSORFLOW + textwrap.dedent(f'''
      import numpy as np
      import tensorflow_datasets as tfds
      try:
        import tensorflow
        raise SystemExit('tensorflow importable')
      except ModuleNotFoundError:
        pass
      dirs = {dict(data['dirs'])!r}
      for name, size in [('celebahq64', 64), ('celebahq256', 256), ('lsun_church', 256)]:
        src = tfds.builder_from_directory(dirs[name]).as_data_source('train')
        image = src[0]['image']
        assert image.shape == (size, size, 3) and image.dtype == np.uint8, name
        raw = tfds.builder_from_directory(dirs[name]).as_data_source(
            'train', decoders={{'image': tfds.decode.SkipDecoding()}})
        assert isinstance(raw[0]['image'], bytes), name
      grey = tfds.builder_from_directory(dirs['imagenet2012']).as_data_source('train')
      assert all(grey[i]['image'].shape[2] == 3 for i in range(len(grey)))
      tokens = tfds.builder_from_directory(dirs['owt_jsonl']).as_data_source('train')[0]['tokens']
      assert tokens.dtype == np.uint16 and tokens.shape == (2048,)
      assert 'tensorflow' not in sys.modules
      print('ok', tokens[:4].tolist())
      ''')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  want = tfds.builder_from_directory(data['dirs']['owt_jsonl']).as_data_source('train')[0]
  assert out.stdout.strip().splitlines()[-1] == f'ok {want["tokens"][:4].tolist()}'
