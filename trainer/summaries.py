"""TensorBoard summaries, written by process 0 only, plus image helpers.

Written with tensorboardX's protos and record writer, which need no TensorFlow (tensorboard's
own writer imports TensorFlow wherever it is installed; tensorboardX imports torch where that
is installed, a second or two once).
"""
from __future__ import annotations

import glob
import io
import math
import os
import time
import uuid

import jax
import numpy as np
from PIL import Image


class Summaries:
  """Scalars, images and text for TensorBoard; every method is a no-op when disabled.

  Events are written synchronously and flushed after every call: a few small writes every
  logging interval, in exchange for TensorBoard seeing them at once and a crash losing none.
  (tensorboardX's SummaryWriter queues events to a thread whose flush() does not drain the
  queue, so a test or a short run could find nothing on disk.)
  """

  def __init__(self, logdir: str, enabled: bool | None = None):
    if enabled is None:
      enabled = jax.process_index() == 0
    self._writer = None
    if enabled:
      # tensorboardX imports torch wherever installed: pay for it only where events are written
      from tensorboardX import event_file_writer, record_writer, summary
      from tensorboardX.proto import event_pb2
      self._tbx, self._event = summary, event_pb2.Event
      record_writer.directory_check(logdir)  # makedirs, or nothing for gs:// and s3://
      # The file is named by time in whole seconds and host: without a unique suffix a
      # run resumed within the same second would overwrite the earlier file.
      self._writer = event_file_writer.EventsWriter(
          os.path.join(logdir, 'events'), f'.{os.getpid()}.{uuid.uuid4().hex[:8]}')

  @property
  def enabled(self) -> bool:
    return self._writer is not None

  def _write(self, step: int, *summaries) -> None:
    now = time.time()
    for summary in summaries:
      self._writer.write_event(self._event(wall_time=now, step=step, summary=summary))
    self._writer.flush()

  def scalars(self, values: dict[str, float], step: int) -> None:
    if self._writer:
      self._write(step, *(self._tbx.scalar(tag, float(v)) for tag, v in values.items()))

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """`image` is HWC with C in {1, 3}: uint8, or float in [0, 1]."""
    if self._writer:
      self._write(step, self._tbx.image(tag, _to_uint8(image), dataformats='HWC'))

  def text(self, tag: str, text: str, step: int) -> None:
    """Markdown, e.g. a config dump (indented 4 spaces to show verbatim) or samples.

    TensorBoard lists it under the tag `<tag>/text_summary`.
    """
    if self._writer:
      self._write(step, self._tbx.text(tag, text))

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()
      self._writer = None


def _to_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'expected an HWC image with 1 or 3 channels, got shape {image.shape}')
  if image.dtype == np.uint8:
    return image
  # tensorboardX would scale floats by 255 and wrap around outside [0, 1]; clip and round here.
  return np.round(np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int, pad: int = 1, *,
               value_range: tuple[float, float]) -> np.ndarray:
  """Tiles `images` [n, H, W, C] into one uint8 HWC image, row by row.

  `value_range` (e.g. (-1, 1) or (0, 1)) maps linearly onto 0..255, clipping outside it.
  `pad` white pixels separate the tiles and frame the grid, so the result is
  (rows * (H + pad) + pad, ncols * (W + pad) + pad, C) with rows = ceil(n / ncols);
  cells after the last image stay white.
  """
  images = np.asarray(images, dtype=np.float32)
  n, h, w, c = images.shape
  lo, hi = value_range
  tiles = np.round(np.clip((images - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
  rows = math.ceil(n / ncols)
  grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, tile in enumerate(tiles):
    y, x = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
    grid[y:y + h, x:x + w] = tile
  return grid


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
