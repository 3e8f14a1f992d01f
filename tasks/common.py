"""Pieces shared by every objective."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Leaf names that are embeddings, norms or biases: never weight-decayed.
_NO_DECAY = ('bias', 'scale', 'embedding', 'cls_token')


def weight_decay_mask(params):
  """True for matmul kernels only; embeddings, norm scales and biases are excluded."""
  def decay(path, _):
    # the last dict key; boxed (nn.LogicallyPartitioned) trees end in an attribute key instead
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-1] not in _NO_DECAY
  return jax.tree_util.tree_map_with_path(decay, params)


# Every uint8 pixel value as float32 in [-1, 1], computed on the host exactly as the image sources
# once did (`x.astype(np.float32) / 127.5 - 1`). The device looks values up instead of dividing:
# XLA turns a division by a constant into a multiplication by its reciprocal, which differs from
# the division in the last bit for 205 of the 256 values.
_PIXEL_VALUES = np.arange(256, dtype=np.float32) / 127.5 - 1


def pixels_to_float(images):
  """uint8 pixels [..] in [0, 255] -> float32 in [-1, 1]; float images (synthetic data, samples,
  latents) are returned unchanged. Call it inside jit, so that images travel as uint8."""
  if images.dtype != jnp.uint8:
    return images
  return jnp.asarray(_PIXEL_VALUES)[images]


def prepare_images(batch: dict) -> dict:
  """The batch with a uint8 'image' (what the pixel sources in input/ yield) as float32 in
  [-1, 1]: the first thing the train and eval steps do, before a codec or a task sees it."""
  if 'image' not in batch:
    return batch
  return {**batch, 'image': pixels_to_float(batch['image'])}


def batch_mask(batch, size: int) -> jax.Array:
  """Eval batches carry 'mask' (1 real row, 0 padding); training batches are all real."""
  mask = batch.get('mask')
  return jnp.ones((size,), jnp.float32) if mask is None else mask.astype(jnp.float32)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy in float32; logits [..., v], integer labels [...]."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
  return nll
