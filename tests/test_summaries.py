"""Summaries: scalars, images and text read back from the event files; image helpers."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

from trainer.summaries import Summaries, image_grid, read_scalars, save_png, upscale_for


def load(logdir):
  acc = ea.EventAccumulator(str(logdir), size_guidance={ea.IMAGES: 0, ea.TENSORS: 0})
  acc.Reload()
  return acc


def test_scalars_round_trip(tmp_path):
  s = Summaries(str(tmp_path), enabled=True)
  values = {1: 2.5, 2: 1.25, 3: 0.1}
  for step, loss in values.items():
    s.scalars({'learning/loss': loss, 'perf/mfu': np.float32(step / 10)}, step)
  got = read_scalars(str(tmp_path))  # on disk already, before close(): a crash loses nothing
  s.close()
  assert set(got) == {'learning/loss', 'perf/mfu'}
  assert [step for step, _ in got['learning/loss']] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in got['learning/loss']], list(values.values()),
                             rtol=1e-7)
  np.testing.assert_allclose([v for _, v in got['perf/mfu']], [0.1, 0.2, 0.3], rtol=1e-7)


def test_resumed_run_in_same_dir_keeps_both_files(tmp_path):
  for steps in ([1, 2], [3, 4]):  # well within one second: file names must still differ
    s = Summaries(str(tmp_path), enabled=True)
    for step in steps:
      s.scalars({'loss': step}, step)
    s.close()
  assert [step for step, _ in read_scalars(str(tmp_path))['loss']] == [1, 2, 3, 4]


def test_image_and_text(tmp_path):
  s = Summaries(str(tmp_path), enabled=True)
  gray = np.linspace(0, 1, 6 * 4).reshape(6, 4, 1)
  rgb = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
  s.image('samples/gray', gray, step=3)
  s.image('samples/rgb', rgb, step=3)
  s.text('config', '    hidden = 128', step=0)
  acc = load(tmp_path)
  assert sorted(acc.Tags()['images']) == ['samples/gray', 'samples/rgb']
  event = acc.Images('samples/rgb')[0]
  assert (event.step, event.width, event.height) == (3, 7, 5)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(event.encoded_image_string))),
                                rgb)
  decoded = Image.open(io.BytesIO(acc.Images('samples/gray')[0].encoded_image_string))
  np.testing.assert_array_equal(np.asarray(decoded.convert('L')), np.round(gray[..., 0] * 255))
  # text is a string tensor for TensorBoard's text plugin, under tag + '/text_summary'
  assert acc.Tags()['tensors'] == ['config/text_summary']
  assert acc.SummaryMetadata('config/text_summary').plugin_data.plugin_name == 'text'
  text = acc.Tensors('config/text_summary')[0]
  assert text.step == 0 and text.tensor_proto.string_val == [b'    hidden = 128']
  s.close()


def test_disabled_writes_nothing(tmp_path):
  logdir = tmp_path / 'logs'
  s = Summaries(str(logdir), enabled=False)
  assert not s.enabled
  s.scalars({'a': 1.0}, 1)
  s.image('i', np.zeros((2, 2, 3)), 1)
  s.text('t', 'x', 1)
  s.flush()
  s.close()
  assert not logdir.exists()


def test_default_is_enabled_on_process_0(tmp_path):
  s = Summaries(str(tmp_path))
  assert s.enabled  # a single-process test run is process 0
  s.close()


def test_image_rejects_bad_shapes(tmp_path):
  s = Summaries(str(tmp_path), enabled=True)
  with pytest.raises(ValueError, match='HWC'):
    s.image('bad', np.zeros((2, 2, 4)), 1)
  s.close()


def test_image_grid():
  images = np.full((10, 8, 8, 1), -1.0, np.float32)
  images[3] = 1.0
  pad = 1
  grid = image_grid(images, ncols=5, pad=pad, value_range=(-1, 1))
  # Tiles are separated and framed by `pad` pixels: rows * (H + pad) + pad.
  assert grid.shape == (2 * (8 + pad) + pad, 5 * (8 + pad) + pad, 1)
  assert grid.dtype == np.uint8
  y, x = pad, pad + 3 * (8 + pad)
  assert (grid[y:y + 8, x:x + 8] == 255).all()  # image 3: value 1 -> 255
  assert (grid[pad:pad + 8, pad:pad + 8] == 0).all()  # image 0: value -1 -> 0
  assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()  # white padding

  partial = image_grid(np.full((3, 4, 4, 3), 0.5), ncols=2, pad=0, value_range=(0, 1))
  assert partial.shape == (8, 8, 3)
  assert (partial[:4] == 128).all() and (partial[4:, :4] == 128).all()
  assert (partial[4:, 4:] == 255).all()  # the empty cell


def test_image_grid_upscales_by_repeating_pixels_and_labels_rows():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, size=(6, 5, 4, 1)).astype(np.float32)
  plain = image_grid(images, ncols=3, pad=0, value_range=(-1, 1))
  big = image_grid(images, ncols=3, pad=0, value_range=(-1, 1), scale=3)
  assert big.shape == (2 * 15, 3 * 12, 1)
  # nearest neighbour: every 3x3 block is one pixel of the plain grid
  np.testing.assert_array_equal(big, plain.repeat(3, axis=0).repeat(3, axis=1))
  assert upscale_for(28) == 3 and upscale_for(32) == 3 and upscale_for(256) == 1

  labelled = image_grid(images, ncols=3, pad=1, value_range=(-1, 1), scale=3,
                        row_labels=['0 T-shirt/top', '1 Trouser'])
  unlabelled = image_grid(images, ncols=3, pad=1, value_range=(-1, 1), scale=3)
  margin = labelled.shape[1] - unlabelled.shape[1]
  assert labelled.shape[0] == unlabelled.shape[0] and margin > 20
  np.testing.assert_array_equal(labelled[:, margin:], unlabelled)
  # each row's label is drawn (dark pixels) beside that row and nowhere else
  row = lambda r: labelled[1 + r * 16:1 + r * 16 + 15, :margin]
  assert (row(0) < 128).any() and (row(1) < 128).any()
  assert (labelled[0, :margin] == 255).all() and (labelled[16, :margin] == 255).all()
  with pytest.raises(ValueError, match='3 row labels for a grid of 2 rows'):
    image_grid(images, ncols=3, value_range=(-1, 1), row_labels=['a', 'b', 'c'])


def test_save_png_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  for c in (1, 3):
    image = rng.integers(0, 256, (5, 6, c), dtype=np.uint8)
    path = tmp_path / 'sub' / f'img{c}.png'
    save_png(str(path), image)
    loaded = np.asarray(Image.open(path))
    np.testing.assert_array_equal(loaded.reshape(image.shape), image)
  with pytest.raises(ValueError):
    save_png(str(tmp_path / 'x.png'), np.zeros((5, 6, 3), np.float32))


def test_plot_curves_draws_each_tag_from_the_events(tmp_path, capsys):
  from tools import plot_curves
  s = Summaries(str(tmp_path / 'tb'), enabled=True)
  for step in range(1, 101):
    s.scalars({'learning/loss': 2.0 * 0.97 ** step}, step)
    if step % 25 == 0:
      s.scalars({'eval/loss': 2.2 * 0.97 ** step}, step)
  s.close()
  out = tmp_path / 'curves.png'
  assert plot_curves.main(['--logdir', str(tmp_path / 'tb'), '--tags', 'learning/loss',
                           'eval/loss', '--out', str(out), '--log_y']) == 0
  from PIL import Image
  image = np.asarray(Image.open(out))
  assert image.shape == (plot_curves.HEIGHT, plot_curves.WIDTH, 3)
  blue, orange = (np.all(image == c, axis=-1) for c in plot_curves.COLOURS[:2])
  assert blue.sum() > 300 and orange.sum() > 50
  # the loss falls: inside the plotting area its line starts high on the left, ends low
  area = blue[:, plot_curves.LEFT + 2:plot_curves.LEFT + 60]
  right = plot_curves.WIDTH - plot_curves.RIGHT
  late = blue[:, right - 60:right - 2]
  assert np.nonzero(area)[0].mean() < np.nonzero(late)[0].mean()
  assert plot_curves.main(['--logdir', str(tmp_path / 'tb'), '--tags', 'eval/acc', '--out',
                           str(out)]) == 2
  assert "no scalar 'eval/acc'" in capsys.readouterr().err
