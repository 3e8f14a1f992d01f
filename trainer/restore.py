"""The parameters of a finished (or running) training run, read from its workdir's latest
checkpoint: what sampling, evaluation and exporting a model start from. Reads only: nothing under
the workdir is created or changed."""
from __future__ import annotations

import os

import jax

from layers import sharding
from trainer import state as state_lib
from trainer.checkpoint import Checkpointer


def latest_params(run, workdir: str, ema: bool = True):
  """(params, step, meta) of the latest checkpoint under `workdir`: the EMA parameters when the
  run keeps them and `ema`, else the trained ones; laid out on the run's mesh. The checkpoint
  must come from the run's own experiment (its record says which)."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):   # checked first: the checkpointer would create it
    raise FileNotFoundError(f'no checkpoints in {workdir} (no {directory}); train there first')
  s = run.loop
  ckpt = Checkpointer(directory, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {directory}; train there first')
    meta = ckpt.read_meta()
    if meta.get('experiment') not in (None, s.experiment):
      raise state_lib.TrainError(
          f'the checkpoint in {directory} is of experiment {meta["experiment"]}, not '
          f'{s.experiment}; pass --exp={meta["experiment"]}')
    mesh = sharding.make_mesh(s.mesh)
    init_state = state_lib.make_init_state(run.model, run.task, run.optimizer.tx, s.ema_decay)
    _, abstract = state_lib.shard_state(init_state, jax.random.key(s.seed), mesh)
    state, meta = ckpt.restore(abstract)
  finally:
    ckpt.close()
  params = state.ema if ema and s.ema_decay else state.params
  return params, int(state.step), meta
