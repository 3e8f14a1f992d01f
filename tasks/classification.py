"""Image classification: softmax cross-entropy (optional label smoothing) and accuracy."""
from __future__ import annotations

import jax.numpy as jnp

from tasks.common import batch_mask, cross_entropy


class Classification:
  """batch: {'image': [b, H, W, c], 'label': int [b], optional 'mask': [b]}."""

  def __init__(self, num_classes: int, image_size: int = 0, channels: int = 0,
               label_smoothing: float = 0.0):
    self.num_classes = num_classes
    self.image_size, self.channels = image_size, channels
    self.label_smoothing = label_smoothing

  def init_inputs(self, batch_size: int):
    """Zeros shaped like the model's inputs, for initialisation and eval_shape."""
    return (jnp.zeros((batch_size, self.image_size, self.image_size, self.channels)),)

  def loss(self, model, params, batch, rng):
    del rng
    logits = model.apply({'params': params}, batch['image'])
    loss = cross_entropy(logits, batch['label'], self.label_smoothing).mean()
    accuracy = (logits.argmax(-1) == batch['label']).mean()
    return loss, {'accuracy': accuracy}

  def eval_step(self, model, params, batch):
    logits = model.apply({'params': params}, batch['image'])
    mask = batch_mask(batch, logits.shape[0])
    nll = cross_entropy(logits, batch['label'])
    return {'loss_sum': (nll * mask).sum(),
            'correct': ((logits.argmax(-1) == batch['label']) * mask).sum(),
            'count': mask.sum()}

  def finalize(self, sums):
    n = max(float(sums['count']), 1.0)
    return {'loss': float(sums['loss_sum']) / n, 'accuracy': float(sums['correct']) / n}
