"""The parameters of a finished (or running) training run, read from its workdir's latest
checkpoint: what sampling, evaluation and exporting a model start from. Reads only: nothing under
the workdir is created or changed."""
from __future__ import annotations

import json

from absl import logging
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


def jsonable(value):
  return json.loads(json.dumps(value, default=repr))


def _param_shapes(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))}


def check_compatible(step, meta, saved, experiment, knobs, abstract, directory,
                     action: str = 'resume') -> None:
  """Refuses (TrainError) a checkpoint of another experiment, or whose parameters have other
  shapes than this run's, naming the knobs that differ; logs knobs that changed harmlessly.
  `saved`: Orbax's metadata tree of the checkpoint's state; `action`: what the caller does with
  it ('resume', 'read'), for the messages."""
  theirs = meta.get('experiment')
  if theirs and theirs != experiment:
    raise state_lib.TrainError(
        f'{directory} holds checkpoints of {theirs} (step {step}), not {experiment}: pass '
        f'--exp={theirs} to {action} that run, or another --workdir; nothing was changed')
  old = meta.get('knobs') or {}
  new = jsonable(knobs or {})
  changed = {k: (old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]}
  diff = ', '.join(f'{k}={a!r} there, {b!r} here' for k, (a, b) in changed.items())
  here, there = _param_shapes(abstract.params), _param_shapes(saved.get('params', {}))
  has_ema = bool(jax.tree.leaves(saved.get('ema')))
  if here != there or has_ema != (abstract.ema is not None):
    where = sorted(set(here) ^ set(there)) or [k for k in here if here[k] != there[k]]
    detail = (f'{where[0]} {there.get(where[0], "absent")} there, {here.get(where[0], "absent")} '
              f'here' if where else 'EMA parameters present in one and not the other')
    layout = _layout_hint(here, there)
    raise state_lib.TrainError(
        f'the checkpoint of step {step} in {directory} does not fit this run of {experiment} '
        f'({layout or detail}); knobs that differ: '
        f'{diff or "none recorded (the model code changed?)"}. '
        f'Use the checkpoint\'s knobs to {action} it, or another --workdir; nothing was changed')
  if changed:
    logging.warning('%s step %d with knobs changed since the checkpoint: %s',
                    'resuming' if action == 'resume' else 'reading', step, diff)


def _layout_hint(here: dict, there: dict) -> str:
  """Names the SCAN_LAYERS setting that reads a checkpoint whose blocks are laid out the other
  way (stacked under 'blocks', or one 'block<i>' each), or the one 'qkv' parameter that
  FUSED_QKV had until 2026-12-03; '' when neither is the difference."""
  if any("['qkv']" in k for k in there) and not any("['qkv']" in k for k in here):
    return ("its attention keeps q, k, v in one 'qkv' parameter, FUSED_QKV's layout before "
            "2026-12-03 (FUSED_QKV now applies 'query', 'key', 'value' as one matmul): train "
            "it again, or split each 'qkv' kernel and bias on their axis of 3 into those three")
  scanned = lambda shapes: any("['blocks']" in k for k in shapes)
  unrolled = lambda shapes: any("['block0']" in k for k in shapes)
  if scanned(there) and unrolled(here):
    return ('its blocks are stacked (saved with SCAN_LAYERS=True) and this run unrolls them: '
            'pass --set SCAN_LAYERS=True')
  if unrolled(there) and scanned(here):
    return ('its blocks are one module each (saved with SCAN_LAYERS=False) and this run scans '
            'them: pass --set SCAN_LAYERS=False')
  return ''


def latest_params(run, workdir: str, ema: bool = True, knobs: dict | None = None):
  """(params, step, meta) of the latest checkpoint under `workdir`: the EMA parameters when the
  run keeps them and `ema`, else the trained ones; laid out on the run's mesh. The checkpoint
  must come from the run's own experiment (its record says which) and fit its model; given
  `knobs` (the experiment's knob values) a misfit names the knobs that differ."""
  directory = workdir_lib.join(workdir_lib.resolve(workdir), 'checkpoints')
  if not epath.Path(directory).is_dir():   # checked first: the checkpointer would create it
    raise FileNotFoundError(f'no checkpoints in {workdir} (no {directory}); train there first')
  s = run.loop
  ckpt = Checkpointer(directory, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}; train there first')
    meta = ckpt.read_meta(step)
    mesh = sharding.make_mesh(s.mesh)
    init_state = state_lib.make_init_state(run.model, run.task, run.optimizer.tx, s.ema_decay)
    _, abstract = state_lib.shard_state(init_state, jax.random.key(s.seed), mesh)
    check_compatible(step, meta, ckpt.saved_tree(step), s.experiment, knobs, abstract, directory,
                     action='read')
    state, meta = ckpt.restore(abstract, step)
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
