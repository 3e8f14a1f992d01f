"""Samples from a trained run, without training: `launch.py --mode=sample`.

Image models write `out` as an .npz with `images` (uint8 [N, H, W, C], the pixels a viewer shows:
a latent model's samples decoded by its VAE) and `labels` (the class each was conditioned on,
spread evenly over the classes), and a PNG grid beside it. Language models write `out` as JSON
lines: N held-out prompts (the first half of the eval split's first N windows) and their sampled
continuations, text and tokens. Samples are drawn in batches over every device of every host,
each batch from its own key folded from SEED, so the same command gives the same file.
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from tqdm import tqdm

from layers import sharding
from trainer import state as state_lib
from trainer.restore import latest_params
from trainer.summaries import image_grid, save_png, upscale_for


def spread_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """Sample i is conditioned on class floor(i * K / N): every class equally often (to one) and
  in order, the first class first."""
  return (np.arange(num_samples) * num_classes // num_samples).astype(np.int32)


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8, the same rounding the training grids use."""
  return np.round(np.clip((np.asarray(images, np.float32) + 1) / 2, 0, 1) * 255).astype(np.uint8)


def batch_size_for(mesh, num_samples: int, batch_size: int) -> int:
  """min(batch_size, num_samples) rounded up to a multiple of the mesh's batch shards."""
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  return -(-min(batch_size, num_samples) // shards) * shards


def draw_images(run, params, frozen, labels, key, mesh, batch: int, decode=None,
                desc: str | None = None):
  """Yields (pixels, n) for each batch of `labels`: pixels a global [batch, H, W, C] array in
  [-1, 1] (decoded by `decode(frozen, latents)` for a latent model), sharded over the batch
  rows of `mesh`, whose first n rows are real (the last batch is padded). Batch i draws with
  key fold_in(key, i), so the images do not depend on how many come after them."""
  task = run.task
  rows = state_lib.batch_sharding(mesh, batch)
  shape = (task.image_size, task.image_size, task.channels)
  steps = -(-len(labels) // batch)
  for i in tqdm(range(steps), desc=desc, disable=desc is None or jax.process_index() != 0):
    part = labels[i * batch:(i + 1) * batch]
    padded = np.concatenate([part, np.full(batch - len(part), part[-1], np.int32)])
    global_labels = jax.make_array_from_callback((batch,), rows, lambda index: padded[index])
    x = task.sample(run.model, params, global_labels, jax.random.fold_in(key, i), shape)
    yield (decode(frozen, x) if decode is not None else x), len(part)


def sample_images(run, workdir: str, num_samples: int, out: str,
                  batch_size: int | None = None, knobs: dict | None = None) -> dict:
  """Draw `num_samples` class-conditional images from the latest checkpoint (EMA parameters when
  the run keeps them) and write them to `out` (.npz) and a PNG grid beside it; returns
  {'images', 'labels', 'step', 'grid'}."""
  s, task, codec = run.loop, run.task, run.codec
  if not hasattr(task, 'sample'):
    raise state_lib.TrainError(f'{type(task).__name__} draws no images; --mode=sample covers '
                               'the image generators (DiT) so far')
  if num_samples <= 0:
    raise state_lib.TrainError(f'--num_samples={num_samples} must be positive')
  params, step, _ = latest_params(run, workdir, knobs=knobs)
  mesh = sharding.make_mesh(s.mesh)
  batch = batch_size_for(mesh, num_samples, batch_size or s.global_batch)
  frozen, _ = state_lib.place_frozen(codec, mesh)
  decode = jax.jit(codec.decode) if codec is not None else None
  labels = spread_labels(num_samples, task.num_classes)
  is_main = jax.process_index() == 0

  chunks = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    for x, n in draw_images(run, params, frozen, labels, jax.random.key(s.seed), mesh, batch,
                            decode, desc=f'sampling {num_samples}'):
      x = multihost_utils.process_allgather(x, tiled=True)
      chunks.append(to_uint8(x)[:n])
  images = np.concatenate(chunks)
  grid_path = os.path.splitext(out)[0] + '.png'
  if is_main:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, images=images, labels=labels)
    ncols = math.ceil(math.sqrt(num_samples))
    save_png(grid_path, image_grid(images, ncols, value_range=(0, 255),
                                   scale=upscale_for(images.shape[1])))
  return {'images': images, 'labels': labels, 'step': step, 'grid': grid_path}


def continue_held_out(run, params, num_samples: int, key, mesh, desc: str | None = None):
  """Records {'prompt', 'continuation', 'prompt_tokens', 'tokens'} of the first `num_samples`
  held-out prompts (the first half of the eval split's first windows) continued by the model."""
  s, task, source = run.loop, run.task, run.eval_data
  rows = state_lib.batch_sharding(mesh, s.global_batch)
  state_lib.feed([source], rows, s.global_batch)
  plen = task.seq_len // 2
  batches = -(-num_samples // s.global_batch)
  if batches > source.num_eval_batches():
    raise state_lib.TrainError(f'--num_samples={num_samples}: the eval split has only '
                               f'{source.num_examples} prompts')
  from input.tokenizer import gpt2_encoding
  enc = gpt2_encoding()
  text = lambda tokens: enc.decode([int(t) for t in tokens if t < enc.n_vocab])
  records = []
  for i in tqdm(range(batches), desc=desc, disable=desc is None or jax.process_index() != 0):
    local = source.batch(i)
    prompts, mask = state_lib.to_global(rows, (local['tokens'][:, :plen], local['mask']),
                                        s.global_batch)
    tokens = task.continue_prompts(run.model, params, prompts, jax.random.fold_in(key, i))
    tokens = np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    mask = np.asarray(multihost_utils.process_allgather(mask, tiled=True))
    for row in tokens[mask > 0][:num_samples - len(records)]:
      records.append({'prompt': text(row[:plen]), 'continuation': text(row[plen:]),
                      'prompt_tokens': row[:plen].tolist(), 'tokens': row[plen:].tolist()})
  return records


def sample_text(run, workdir: str, num_samples: int, out: str,
                knobs: dict | None = None) -> dict:
  """Continue `num_samples` held-out prompts from `run.eval_data` with the latest checkpoint and
  write them to `out` (.jsonl); returns {'records', 'step'}."""
  if num_samples <= 0:
    raise state_lib.TrainError(f'--num_samples={num_samples} must be positive')
  params, step, _ = latest_params(run, workdir, knobs=knobs)
  mesh = sharding.make_mesh(run.loop.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    records = continue_held_out(run, params, num_samples, jax.random.key(run.loop.seed), mesh,
                                desc=f'sampling {num_samples}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
      for r in records:
        f.write(json.dumps(r) + '\n')
  return {'records': records, 'step': step}
