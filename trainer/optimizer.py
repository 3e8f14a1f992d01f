"""AdamW with warmup, a constant or cosine schedule, global-norm clipping and the decay mask."""
from __future__ import annotations

from typing import Callable, NamedTuple

import optax

from tasks.common import weight_decay_mask


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  lr: Callable  # step -> learning rate, for logging


def adamw(lr: float, warmup: int, schedule: str, num_steps: int, weight_decay: float = 0.0,
          b1: float = 0.9, b2: float = 0.999, grad_clip: float = 0.0) -> Optimizer:
  """Linear warmup to `lr` over `warmup` steps, then constant or cosine decay to 0 at num_steps.

  `weight_decay` is optax's (and PyTorch's) decoupled decay: a decayed weight w loses
  lr_t * weight_decay * w at step t, on top of the Adam update (experiments/base.py)."""
  warmup = max(int(warmup), 0)
  if schedule == 'constant':
    after = optax.constant_schedule(lr)
  elif schedule == 'cosine':
    after = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1))
  else:
    raise ValueError(f"schedule {schedule!r}: use 'constant' or 'cosine'")
  lr_fn = (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
           if warmup else after)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(lr_fn, b1=b1, b2=b2, weight_decay=weight_decay,
                           mask=weight_decay_mask))
  return Optimizer(optax.chain(*parts), lr_fn)
