"""The parameters of a finished (or running) training run, read from its workdir's latest
checkpoint: what sampling, evaluation and exporting a model start from. Reads only: nothing under
the workdir is created or changed."""
from __future__ import annotations

from etils import epath

import jax
import jax.numpy as jnp
import numpy as np

from layers import sharding
from tasks.common import pixels_to_float
from trainer import state as state_lib
from trainer import workdir as workdir_lib
from trainer.checkpoint import Checkpointer


# Knobs that decide how a checkpoint's parameters are laid out without changing what the model
# computes, with the value a checkpoint whose record predates the knob was saved with.
LAYOUT_KNOBS = {'SCAN_LAYERS': False}


def layout_overrides(workdir: str) -> list[str]:
  """`KNOB=VALUE` overrides that build a run laid out like the latest checkpoint under `workdir`
  ([] when there is none): a classifier trained before SCAN_LAYERS existed, or with the other
  setting, still loads as the judge of a generator."""
  directory = workdir_lib.join(workdir_lib.resolve(workdir), 'checkpoints')
  if not epath.Path(directory).is_dir():
    return []
  ckpt = Checkpointer(directory, async_save=False)
  try:
    if ckpt.latest_step() is None:
      return []
    knobs = ckpt.read_meta().get('knobs') or {}
  finally:
    ckpt.close()
  return [f'{k}={knobs.get(k, default)!r}' for k, default in LAYOUT_KNOBS.items()]


def latest_params(run, workdir: str, ema: bool = True):
  """(params, step, meta) of the latest checkpoint under `workdir`: the EMA parameters when the
  run keeps them and `ema`, else the trained ones; laid out on the run's mesh. The checkpoint
  must come from the run's own experiment (its record says which)."""
  directory = workdir_lib.join(workdir_lib.resolve(workdir), 'checkpoints')
  if not epath.Path(directory).is_dir():   # checked first: the checkpointer would create it
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


class TrainedClassifier:
  """A classifier trained in this project (a ViT experiment's checkpoint), frozen, as the judge
  of a generator's samples: `features(params, pixels)` -> {'features': pre-logit embedding,
  'logits'} for pixels [b, H, W, c] in [0, 255]. The parameters are the checkpoint's (EMA when
  kept), gathered to the host; the trainer places them on its own mesh."""

  def __init__(self, exp: str, workdir: str):
    import types
    import fiddle as fdl
    from experiments import base   # lazily: experiments import the trainer's optimizer
    from jax.experimental import multihost_utils
    _, cfg = base.build_config(exp, layout_overrides(workdir))
    run = types.SimpleNamespace(**{k: fdl.build(getattr(cfg, k))
                                   for k in ('model', 'task', 'optimizer', 'loop')})
    self.exp, self.model = exp, run.model
    self.image_size, self.channels = run.task.image_size, run.task.channels
    try:
      params, self.step, _ = latest_params(run, workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f'{e} (the judging classifier {exp}: `python launch.py '
                              f'--exp={exp} --workdir={workdir}`)') from None
    self.params = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(
        a, tiled=True)), params)

  def abstract_params(self):
    shape = (1, self.image_size, self.image_size, self.channels)
    return jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros(shape))['params']

  def features(self, params, pixels):
    if pixels.shape[1:] != (self.image_size, self.image_size, self.channels):
      raise ValueError(f'the judging classifier {self.exp} takes {self.image_size}x'
                       f'{self.image_size}x{self.channels} images, the samples are '
                       f'{"x".join(map(str, pixels.shape[1:]))}')
    # through the uint8 lookup the classifier was trained on, so a real image it is shown
    # (quantised pixels) reaches it bit for bit as in training
    x = pixels_to_float(jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8))
    logits, features = self.model.apply({'params': params}, x, return_features=True)
    return {'features': features, 'logits': logits}
