"""Image classification: softmax cross-entropy (optional label smoothing and mixup), accuracy."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tasks.common import batch_mask, cross_entropy


class Classification:
  """batch: {'image': [b, H, W, c], 'label': int [b], optional 'mask': [b]}."""

  def __init__(self, num_classes: int, image_size: int = 0, channels: int = 0,
               label_smoothing: float = 0.0, mixup: float = 0.0):
    self.num_classes = num_classes
    self.image_size, self.channels = image_size, channels
    self.label_smoothing = label_smoothing
    self.mixup = mixup

  def init_inputs(self, batch_size: int):
    """Zeros shaped like the model's inputs, for initialisation and eval_shape."""
    return (jnp.zeros((batch_size, self.image_size, self.image_size, self.channels)),)

  def loss(self, model, params, batch, rng):
    images, labels = batch['image'], batch['label']
    if self.mixup:
      # big_vision's mixup, on the device: one weight a ~ Beta(p, p) per batch, kept >= 1/2 so
      # each image's own label dominates; every image is mixed with its neighbour in the batch.
      a = jax.random.beta(rng, self.mixup, self.mixup)
      a = jnp.maximum(a, 1 - a)
      images = a * images + (1 - a) * jnp.roll(images, 1, axis=0)
    logits = model.apply({'params': params}, images)
    nll = cross_entropy(logits, labels, self.label_smoothing)
    if self.mixup:
      nll = a * nll + (1 - a) * cross_entropy(logits, jnp.roll(labels, 1), self.label_smoothing)
    accuracy = (logits.argmax(-1) == labels).mean()
    return nll.mean(), {'accuracy': accuracy}

  def eval_step(self, model, params, batch, rng=None):   # deterministic: rng unused
    logits = model.apply({'params': params}, batch['image'])
    mask = batch_mask(batch, logits.shape[0])
    nll = cross_entropy(logits, batch['label'])
    return {'loss_sum': (nll * mask).sum(),
            'correct': ((logits.argmax(-1) == batch['label']) * mask).sum(),
            'count': mask.sum()}

  def finalize(self, sums):
    n = max(float(sums['count']), 1.0)
    return {'loss': float(sums['loss_sum']) / n, 'accuracy': float(sums['correct']) / n}
