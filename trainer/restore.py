"""The parameters of a finished (or running) training run, read from its workdir's latest
checkpoint: what sampling, evaluation and exporting a model start from. Reads only."""
from __future__ import annotations

import os

import jax

from layers import sharding
from trainer import state as state_lib
from trainer.checkpoint import Checkpointer


def latest_params(run, workdir: str, ema: bool = True):
  """(params, step, meta) of the latest checkpoint under `workdir`: the EMA parameters when the
  run keeps them and `ema`, else the trained ones; laid out on the run's mesh."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):   # checked first: the checkpointer would create it
    raise FileNotFoundError(f'no checkpoints in {workdir} (no {directory}); train there first')
  s = run.loop
  mesh = sharding.make_mesh(s.mesh)
  init_state = state_lib.make_init_state(run.model, run.task, run.optimizer.tx, s.ema_decay)
  _, abstract = state_lib.shard_state(init_state, jax.random.key(s.seed), mesh)
  ckpt = Checkpointer(directory, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {directory}; train there first')
    state, meta = ckpt.restore(abstract)
  finally:
    ckpt.close()
  params = state.ema if ema and s.ema_decay else state.params
  return params, int(state.step), meta
