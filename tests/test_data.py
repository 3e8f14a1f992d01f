"""The real-data pipelines on stand-ins prepared by TFDS in a temp dir: what a batch holds, that it
is a pure function of (seed, step, process), and that a run on the stand-ins trains end to end."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from input import common, images, records, text
from tests.test_launch import launch, ok
from tools import standins
from trainer.summaries import read_scalars

ONE = dict(process_index=0, process_count=1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Every dataset prepared from its stand-in (about 20 s, TensorFlow included)."""
  from input.builders import prepare
  root = tmp_path_factory.mktemp('data')
  data_dir, raw = root / 'tfds', root / 'raw'
  facts = {'data_dir': str(data_dir), 'raw': raw}
  facts['ilsvrc'] = standins.ilsvrc_tars(raw / 'ilsvrc', num_classes=3, per_class=6, num_val=5)
  prepare('imagenet2012', data_dir, raw / 'ilsvrc')
  standins.celebahq_folder(raw / 'celebahq', per_class=3, size=64)
  prepare('celebahq256', data_dir, raw / 'celebahq')
  standins.lsun_folder(raw / 'lsun', n=4)
  prepare('lsun_church', data_dir, raw / 'lsun')
  facts['docs'] = standins.owt_files(raw / 'owt', num_docs=80)
  prepare('openwebtext', data_dir, raw / 'owt', holdout_every=4)
  facts['folder'] = standins.image_folder(raw / 'folder', classes=('cat', 'dog', 'eel'))
  return facts


def imagenet(data, **kw):
  kw = {'global_batch': 4, 'image_size': 32, 'dataset': 'imagenet2012',
        'data_dir': data['data_dir'], **ONE, **kw}
  return images.ImageRecords(**kw)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- images ----------------------------------------------------------------------------------

def test_imagenet_batches_hold_the_right_images_and_labels(data):
  train = imagenet(data, num_classes=1000)
  assert train.num_examples == 18 and len(train.classes) == 1000
  batch = train.batch(2)
  # pixels travel as uint8; the train and eval steps scale them to [-1, 1] on the device
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['image'].min() < 128 <= batch['image'].max()
  # each label is the synset of the file the index names (tfds's label order)
  names = [r['file_name'].decode() for r in train.records.read(train.indices(2))]
  want = [data['ilsvrc']['train_files'][n] for n in names]
  np.testing.assert_array_equal(batch['label'], want)
  val = imagenet(data, split='validation', train=False)
  got = np.concatenate([b['label'][b['mask'] > 0] for b in val.iterate(0, val.num_eval_batches())])
  np.testing.assert_array_equal(np.sort(got), np.sort(data['ilsvrc']['val_label_ids']))


def test_center_crop_matches_a_pil_reference(data):
  """Eval preprocessing = center square, antialiased bicubic resize, uint8. JPEGs are decoded
  at a reduced DCT scale, so they match the full-resolution reference closely, not exactly."""
  val = imagenet(data, split='validation', train=False, image_size=48)
  encoded = val.records.read([0, 1])
  for record in encoded:
    full = Image.open(io.BytesIO(record['image'])).convert('RGB')
    w, h = full.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    want = np.asarray(full.crop(box).resize((48, 48), Image.BICUBIC), np.float32)
    got = val.preprocess(record['image'])
    assert got.shape == (48, 48, 3) and got.dtype == np.uint8
    assert np.abs(got - want).mean() < 0.02 * 127.5, np.abs(got - want).mean()
  # without a reduced decode (PNG) the same crop is exact away from the edges (where resizing
  # within the whole image lets the filter see the pixels just outside the square)
  folder = images.ImageRecords(global_batch=2, image_size=16, split='test', train=False,
                               folder=str(data['raw'] / 'folder'), **ONE)
  png = data['folder']['test']['cat'][1].read_bytes()
  full = Image.open(io.BytesIO(png)).convert('RGB')
  box = images.center_square(*full.size)
  want = np.asarray(full.crop(box).resize((16, 16), Image.BICUBIC), np.float32)
  got = folder.preprocess(png).astype(np.float32)
  np.testing.assert_array_equal(got[2:-2, 2:-2], want[2:-2, 2:-2])
  assert np.abs(got - want).max() < 0.1 * 127.5


def test_training_flips_and_eval_does_not(data):
  train = imagenet(data, global_batch=6)
  plain = imagenet(data, global_batch=6, train=False)
  flips = 0
  for step in range(3):
    batch = train.batch(step)
    for image, record in zip(batch['image'], train.records.read(train.indices(step))):
      centred = plain.preprocess(record['image'])
      if np.array_equal(image, centred[:, ::-1]) and not np.array_equal(image, centred):
        flips += 1
      else:
        np.testing.assert_array_equal(image, centred)
  assert 3 <= flips <= 15   # 18 fair coins


def test_inception_crop_boxes():
  rng = np.random.default_rng(0)
  areas, aspects = [], []
  for _ in range(2000):
    left, top, right, bottom = images.inception_crop_box(500, 375, rng)
    assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
    areas.append((right - left) * (bottom - top) / (500 * 375))
    aspects.append((right - left) / (bottom - top))
  assert 0.045 < min(areas) and max(areas) <= 1 and 0.4 < np.median(areas) < 0.65
  assert 0.74 < min(aspects) and max(aspects) < 1.35
  # an image too thin for any box falls back to the center square
  assert images.inception_crop_box(1000, 10, rng, min_area=0.9) == (495, 0, 505, 10)


def test_augmenting_pipeline_is_deterministic_and_varies(data):
  make = lambda **kw: imagenet(data, augment='inception_crop', **kw)
  a, b = make(seed=1).batch(3), make(seed=1).batch(3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a['image'], make(seed=2).batch(3)['image'])
  # random crops, not the center crop
  center = imagenet(data, flip=False).batch(3)['image']
  assert not np.allclose(a['image'], center)


def test_resume_and_workers_read_exactly_the_straight_run(data):
  """Step k of a run resumed at k (and batches prepared by Grain worker processes) are the
  batches a straight run reads at step k."""
  source = imagenet(data, augment='inception_crop', threads=2)
  straight = list(source.iterate(0, 6))
  resumed = list(source.iterate(4, 6))
  for a, b in zip(straight[4:], resumed):
    assert_batches_equal(a, b)
  source.workers = 2
  in_workers = list(source.iterate(2, 6))
  for a, b in zip(straight[2:], in_workers):
    assert_batches_equal(a, b)
  del in_workers


def test_two_processes_read_disjoint_halves_of_the_global_batch(data):
  whole = imagenet(data, global_batch=6)
  halves = [imagenet(data, global_batch=6, process_index=i, process_count=2) for i in range(2)]
  for step in range(4):   # 24 reads of an 18-image split: crosses an epoch boundary
    idx = [h.indices(step) for h in halves]
    if step < 3:          # within epoch 0 no example repeats
      assert not set(idx[0]) & set(idx[1])
    np.testing.assert_array_equal(np.concatenate(idx), whole.indices(step))
    parts = [h.batch(step) for h in halves]
    assert_batches_equal(whole.batch(step),
                         {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
  epoch = np.concatenate([whole.indices(s) for s in range(3)])
  assert sorted(epoch) == list(range(18))


def test_celebahq_and_lsun(data):
  celeb = images.ImageRecords(global_batch=6, image_size=32, dataset='celebahq256', num_classes=2,
                              data_dir=data['data_dir'], train=False, split='validation', **ONE)
  batch = celeb.batch(0)
  assert celeb.classes == ['female', 'male'] and batch['image'].shape == (6, 32, 32, 3)
  # the stand-in tints female images red and male ones blue: labels travel with their images
  red_minus_blue = batch['image'][..., 0].mean((1, 2)) - batch['image'][..., 2].mean((1, 2))
  np.testing.assert_array_equal(red_minus_blue < 0, batch['label'] == 1)
  church = images.ImageRecords(global_batch=4, image_size=32, dataset='lsun_church',
                               num_classes=1, data_dir=data['data_dir'], **ONE)
  batch = church.batch(0)
  assert (batch['label'] == 0).all() and batch['image'].shape == (4, 32, 32, 3)
  # the stand-ins are pure red outside their centred square and hardly red inside: a center
  # crop (at prepare time and again here) shows no red, a squash would show red bands
  assert (batch['image'][..., 0] < 64).mean() > 0.95   # -0.5 in [-1, 1]


def test_image_folder(data):
  train = images.ImageRecords(global_batch=9, image_size=16, folder=str(data['raw'] / 'folder'),
                              num_classes=3, **ONE)
  assert train.classes == ['cat', 'dog', 'eel'] and train.num_examples == 9
  names = [train.records.paths[i] for i in train.indices(0)]
  want = [['cat', 'dog', 'eel'].index(os.path.basename(os.path.dirname(n))) for n in names]
  np.testing.assert_array_equal(train.batch(0)['label'], want)
  with pytest.raises(ValueError, match='NUM_CLASSES=10 but .* has 3 classes'):
    images.ImageRecords(global_batch=9, image_size=16, folder=str(data['raw'] / 'folder'),
                        num_classes=10, **ONE)
  with pytest.raises(FileNotFoundError, match="no split folder 'validation'.*test, train"):
    images.ImageRecords(global_batch=9, image_size=16, folder=str(data['raw'] / 'folder'),
                        split='validation', **ONE)


def test_missing_dataset_names_it_the_directory_and_the_command(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    images.ImageRecords(global_batch=4, image_size=32, dataset='imagenet2012',
                        data_dir=str(tmp_path), **ONE)
  message = str(e.value)
  for part in ("'imagenet2012' is not prepared", str(tmp_path / 'imagenet2012'),
               f'python tools/build_dataset.py imagenet2012 --data_dir={tmp_path} --source=M',
               'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar'):
    assert part in message, message
  with pytest.raises(FileNotFoundError, match='build_dataset.py openwebtext'):
    text.TokenRecords(global_batch=4, seq_len=8, data_dir=str(tmp_path), **ONE)


def test_default_data_dir_follows_tfds(monkeypatch, tmp_path):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  assert records.default_data_dir() == str(tmp_path)
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert records.default_data_dir() == os.path.expanduser('~/tensorflow_datasets')


# ---- text ------------------------------------------------------------------------------------

def owt_stream(data, split):
  source = text.TokenRecords(global_batch=2, seq_len=8, split=split, data_dir=data['data_dir'],
                             **ONE)
  blocks = source.records.read(range(len(source.records)))
  return np.concatenate([np.asarray(b['tokens'], np.int64) for b in blocks]), source.block


@pytest.mark.parametrize('seq_len', [100, 2048, 3000])
def test_openwebtext_windows_are_slices_of_the_stream(data, seq_len):
  stream, block = owt_stream(data, 'train')
  assert block == 2048 and len(stream) % block == 0
  source = text.TokenRecords(global_batch=4, seq_len=seq_len, data_dir=data['data_dir'], **ONE)
  assert source.num_examples == (len(stream) - 1) // seq_len
  for step in range(3):
    tokens = source.batch(step)['tokens']
    assert tokens.shape == (4, seq_len + 1) and tokens.dtype == np.int32
    for row, i in zip(tokens, source.indices(step)):
      np.testing.assert_array_equal(row, stream[i * seq_len:i * seq_len + seq_len + 1])


def test_openwebtext_stream_is_the_documents_in_order(data):
  """Each split is its documents joined by end-of-text, in reading order, minus the final
  partial block; every 4th document (holdout_every=4) is validation."""
  from input import tokenizer
  decode = lambda tokens: tokenizer.gpt2_encoding().decode(tokens.tolist())
  for split, keep in [('train', lambda i: i % 4), ('validation', lambda i: not i % 4)]:
    stream, block = owt_stream(data, split)
    want = ''.join(d + '<|endoftext|>' for i, d in enumerate(data['docs']) if keep(i))
    got = decode(stream)[:-4]   # the cut may split a multi-byte character
    assert want.startswith(got) and len(want) - len(got) < 10 * block, (split, len(got))
  source = text.TokenRecords(global_batch=3, seq_len=64, split='validation', train=False,
                             data_dir=data['data_dir'], **ONE)
  masks = [b['mask'] for b in source.iterate(0, source.num_eval_batches())]
  assert np.concatenate(masks).sum() == source.num_examples


def test_openwebtext_process_split_and_resume(data):
  make = lambda **kw: text.TokenRecords(global_batch=4, seq_len=128, data_dir=data['data_dir'],
                                        seed=5, **kw)
  whole, halves = make(**ONE), [make(process_index=i, process_count=2) for i in range(2)]
  parts = [h.batch(7)['tokens'] for h in halves]
  np.testing.assert_array_equal(np.concatenate(parts), whole.batch(7)['tokens'])
  assert not set(halves[0].indices(1)) & set(halves[1].indices(1))
  straight = list(whole.iterate(0, 5))
  for a, b in zip(straight[3:], whole.iterate(3, 5)):
    assert_batches_equal(a, b)


def test_reading_needs_no_tensorflow(data):
  code = f'''
import importlib.machinery, importlib.util, sys

class NoTensorFlow(importlib.machinery.PathFinder):   # as if it were not installed
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split('.')[0] != 'tensorflow':
      return super().find_spec(name, path, target)

sys.meta_path = [NoTensorFlow if f is importlib.machinery.PathFinder else f
                 for f in sys.meta_path]
assert importlib.util.find_spec('tensorflow') is None
sys.path.insert(0, {ROOT!r})
from input import images, text
kw = dict(data_dir={data["data_dir"]!r}, process_index=0, process_count=1)
src = images.ImageRecords(global_batch=4, image_size=16, dataset='imagenet2012', workers=1, **kw)
assert next(src.iterate(0, 1))['image'].shape == (4, 16, 16, 3)
tok = text.TokenRecords(global_batch=2, seq_len=16, **kw)
assert tok.batch(0)['tokens'].shape == (2, 17)
assert 'tensorflow' not in sys.modules
print('read without tensorflow')
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and 'read without tensorflow' in out.stdout, out.stderr[-3000:]


# ---- end to end ------------------------------------------------------------------------------

TINY = ['HIDDEN=32', 'DEPTH=1', 'HEADS=2', 'GLOBAL_BATCH=4', 'NUM_STEPS=3', 'LOG_EVERY=1',
        'EVAL_BATCHES=1', 'CKPT_EVERY=3', 'WARMUP=1']


@pytest.mark.parametrize('exp, extra', [
    # on the latents of a tiny random VAE (32x32 images -> 16x16x4), as the ImageNet DiTs train
    ('DiT_S_ImageNet256', ['IMAGE_SIZE=32', 'VAE_DOWNSAMPLE=2', 'PATCH=4', 'DENOISE_STEPS=2',
                           'SAMPLE_CLASSES=2', 'SAMPLES_PER_CLASS=1']),
    ('ViT_B_ImageNet_Augment', ['IMAGE_SIZE=32', 'PATCH=8', 'DATA_WORKERS=1']),
    ('GPT_S_OWT', ['SEQ_LEN=64', 'SAMPLE_TOKENS=4']),
    ('DiT_B_LSUNChurch256', ['IMAGE_SIZE=32', 'PATCH=8', 'DENOISE_STEPS=2']),
])
def test_launch_trains_on_the_prepared_standins(data, tmp_path, exp, extra):
  wd = str(tmp_path / 'wd')
  if exp.startswith('DiT_S'):
    from tests.test_latent_dit import tiny_vae
    extra = [*extra, f'VAE_PATH={tiny_vae(tmp_path / "vae", 3)!r}']
  sets = [a for knob in [*TINY, *extra, f'DATA_DIR={data["data_dir"]!r}'] for a in ('--set', knob)]
  out = ok(launch(f'--exp={exp}', f'--workdir={wd}', *sets))
  assert 'final eval: loss=' in out.stdout
  losses = read_scalars(os.path.join(wd, 'tensorboard'))['learning/loss']
  assert [s for s, _ in losses] == [1, 2, 3] and np.isfinite([v for _, v in losses]).all()
  assert os.path.isdir(os.path.join(wd, 'checkpoints', '3', 'state'))


def test_imagenet_dit_without_the_vae_stops_naming_the_cache_and_the_hub_id(data, tmp_path,
                                                                           monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
  wd = tmp_path / 'wd'
  result = launch('--exp=DiT_S_ImageNet256', f'--workdir={wd}', '--set',
                  f'DATA_DIR={data["data_dir"]!r}')
  assert result.returncode == 1
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('launch.py: error: FileNotFoundError: ') and 'Traceback' not in \
      result.stderr
  assert str(tmp_path / 'hub') in line and "'stabilityai/sd-vae-ft-ema'" in line
  assert 'hf download stabilityai/sd-vae-ft-ema' in line and 'VAE_PATH' in line
  assert not wd.exists()


def test_launch_trains_on_an_image_folder(data, tmp_path):
  wd = str(tmp_path / 'wd')
  sets = [a for knob in [*TINY, 'IMAGE_SIZE=16', 'PATCH=4', 'NUM_CLASSES=3', "EVAL_SPLIT='test'",
                         f"IMAGE_FOLDER={str(data['raw'] / 'folder')!r}"] for a in ('--set', knob)]
  out = ok(launch('--exp=ViT_S_ImageNet', f'--workdir={wd}', *sets))
  assert 'final eval: loss=' in out.stdout and 'accuracy=' in out.stdout


def test_input_bench_measures_a_prepared_pipeline(data, capsys):
  from tools import input_bench
  assert input_bench.main(['--data_dir', data['data_dir'], '--only', 'imagenet_vit224',
                           'openwebtext_1024', '--batch', '4', '--batches', '2']) == 0
  out = capsys.readouterr().out
  assert 'float32 matmul' in out
  rows = [l.split('|') for l in out.splitlines() if l.startswith('| imagenet') or
          l.startswith('| openwebtext')]
  assert len(rows) == 2 and all(float(r[6].replace(',', '')) > 0 for r in rows), out
