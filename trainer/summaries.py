"""TensorBoard summaries, written by process 0 only, plus image helpers.

Events are tensorboard's own Event protos, framed by its RecordWriter (neither imports
TensorFlow); tensorboard's event-file writer imports TensorFlow wherever it is installed, and
tensorboardX imports torch, each seconds of start-up in every training process.
"""
from __future__ import annotations

import glob
import io
import math
import os
import socket
import time
import uuid
from typing import Sequence

import jax
import numpy as np
from PIL import Image


class Summaries:
  """Scalars, images and text for TensorBoard; every method is a no-op when disabled.

  Events are written synchronously and flushed after every call: a few small writes every
  logging interval, in exchange for TensorBoard seeing them at once and a crash losing none.
  A URL logdir (gs://...) is written through etils.epath; its file system may hold the bytes
  until close().
  """

  def __init__(self, logdir: str, enabled: bool | None = None):
    if enabled is None:
      enabled = jax.process_index() == 0
    self._file = None
    if enabled:
      from etils import epath
      from tensorboard.compat.proto import event_pb2, summary_pb2
      from tensorboard.summary.writer.record_writer import RecordWriter
      self._pb, self._event = summary_pb2, event_pb2.Event
      directory = epath.Path(logdir)
      directory.mkdir(parents=True, exist_ok=True)
      # Named by time in whole seconds and host, as TensorBoard expects; the unique suffix keeps
      # a run resumed within the same second from overwriting the earlier file.
      name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
              f'{os.getpid()}.{uuid.uuid4().hex[:8]}')
      self._file = RecordWriter((directory / name).open('wb'))
      self._append(self._event(wall_time=time.time(), file_version='brain.Event:2'))

  @property
  def enabled(self) -> bool:
    return self._file is not None

  def _append(self, event) -> None:
    self._file.write(event.SerializeToString())

  def _write(self, step: int, *values) -> None:
    self._append(self._event(wall_time=time.time(), step=step,
                             summary=self._pb.Summary(value=list(values))))
    self._file.flush()

  def scalars(self, values: dict[str, float], step: int) -> None:
    if self._file:
      self._write(step, *(self._pb.Summary.Value(tag=tag, simple_value=float(v))
                          for tag, v in values.items()))

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """`image` is HWC with C in {1, 3}: uint8, or float in [0, 1]."""
    if self._file:
      image = _to_uint8(image)
      png = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format='PNG')
      h, w, c = image.shape
      self._write(step, self._pb.Summary.Value(tag=tag, image=self._pb.Summary.Image(
          height=h, width=w, colorspace=c, encoded_image_string=png.getvalue())))

  def text(self, tag: str, text: str, step: int) -> None:
    """Markdown, e.g. a config dump (indented 4 spaces to show verbatim) or samples.

    TensorBoard's text plugin reads a string tensor; it is listed under `<tag>/text_summary`.
    """
    if self._file:
      from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2
      from tensorboard.plugins.text import plugin_data_pb2
      metadata = self._pb.SummaryMetadata(plugin_data=self._pb.SummaryMetadata.PluginData(
          plugin_name='text', content=plugin_data_pb2.TextPluginData(
              version=0).SerializeToString()))
      tensor = tensor_pb2.TensorProto(
          dtype='DT_STRING', string_val=[text.encode('utf-8')],
          tensor_shape=tensor_shape_pb2.TensorShapeProto(
              dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
      self._write(step, self._pb.Summary.Value(tag=f'{tag}/text_summary', metadata=metadata,
                                               tensor=tensor))

  def flush(self) -> None:
    if self._file:
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None


def _to_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'expected an HWC image with 1 or 3 channels, got shape {image.shape}')
  if image.dtype == np.uint8:
    return image
  # floats scaled by 255 would wrap around outside [0, 1]; clip and round
  return np.round(np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int, pad: int = 1, *,
               value_range: tuple[float, float], scale: int = 1,
               row_labels: Sequence[str] | None = None) -> np.ndarray:
  """Tiles `images` [n, H, W, C] into one uint8 HWC image, row by row.

  `value_range` (e.g. (-1, 1) or (0, 1)) maps linearly onto 0..255, clipping outside it.
  Each image is enlarged `scale` times by repeating pixels (nearest neighbour: a 28-pixel sample
  stays sharp, and no interpolation invents detail). `pad` white pixels separate the tiles and
  frame the grid, so the result is (rows * (H s + pad) + pad, ncols * (W s + pad) + pad, C)
  with rows = ceil(n / ncols); cells after the last image stay white. `row_labels` (one string
  per row) are written in black in a white margin left of the rows, which widens the grid.
  """
  images = np.asarray(images, dtype=np.float32)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, c = images.shape
  lo, hi = value_range
  tiles = np.round(np.clip((images - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  rows = math.ceil(n / ncols)
  grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, tile in enumerate(tiles):
    y, x = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
    grid[y:y + h, x:x + w] = tile
  if row_labels is None:
    return grid
  if len(row_labels) != rows:
    raise ValueError(f'{len(row_labels)} row labels for a grid of {rows} rows')
  from PIL import ImageDraw, ImageFont
  font = ImageFont.load_default()
  width = max(int(math.ceil(font.getlength(label))) for label in row_labels) + 8
  margin = Image.new('L', (width, grid.shape[0]), 255)
  draw = ImageDraw.Draw(margin)
  for r, label in enumerate(row_labels):
    top, bottom = pad + r * (h + pad), pad + r * (h + pad) + h
    box = draw.textbbox((0, 0), label, font=font)
    draw.text((4, (top + bottom - (box[3] - box[1])) // 2 - box[1]), label, fill=0, font=font)
  margin = np.repeat(np.asarray(margin, np.uint8)[..., None], c, axis=-1)
  return np.concatenate([margin, grid], axis=1)


def upscale_for(size: int, target: int = 84) -> int:
  """The whole factor that brings a `size`-pixel image to at least `target` pixels (28 -> 3)."""
  return max(1, -(-target // size))


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 HWC image (C 1 or 3) as PNG, creating the directory (a local path or a
  URL such as gs://...)."""
  from trainer import workdir
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'expected uint8 HWC with 1 or 3 channels, got {image.dtype} '
                     f'{image.shape}')
  data = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(data, format='PNG')
  workdir.write_bytes(workdir.resolve(path), data.getvalue())


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """All scalars in the event files under `logdir` (recursively), as tag -> [(step, value)].

  For tests and tools: it imports tensorboard's reader, which loads TensorFlow if installed.
  """
  from tensorboard.backend.event_processing import event_accumulator

  scalars = {}
  pattern = os.path.join(logdir, '**', '*tfevents*')
  for path in sorted(glob.glob(pattern, recursive=True)):
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.SCALARS: 0})  # 0 = keep all, no sampling
    acc.Reload()
    for tag in acc.Tags()['scalars']:
      scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
  return {tag: sorted(values, key=lambda sv: sv[0]) for tag, values in scalars.items()}
