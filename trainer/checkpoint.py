"""Orbax checkpoints of the train state plus a small JSON record, one step per directory.

    ckpt = Checkpointer(workdir + '/checkpoints', keep=3)
    ckpt.save(step, state, {'data_position': n, 'experiment': name})
    state, meta = ckpt.restore(abstract_state)  # latest step, into abstract_state's shardings
    ckpt.close()                                # waits for an async save still in flight

Layout: `<directory>/<step>/{state,meta}`; `state` is written by Orbax's
StandardCheckpointHandler (tensorstore; every process writes its own shards) and `meta` by its
JsonCheckpointHandler.

PRNG keys: store the raw key data, `jax.random.key_data(key)` (uint32), and rebuild the key
with `jax.random.wrap_key_data` after restoring. The abstract state then holds a plain uint32
ShapeDtypeStruct and no typed key array ever reaches Orbax.

Every process calls save and restore: Orbax coordinates the processes and writes `meta` once.
"""
from __future__ import annotations

import json
import logging as py_logging
import os

from absl import logging
import orbax.checkpoint as ocp


def _drop_orbax_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager`; the training loop decides when to save."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # Orbax wants absolute paths, and a relative one would resolve against each process's
    # own working directory.
    self.directory = os.path.abspath(os.path.expanduser(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    # Orbax logs dozens of INFO lines per save through absl's one logger; keep its warnings only.
    absl_logger = py_logging.getLogger('absl')
    if _drop_orbax_info not in absl_logger.filters:
      absl_logger.addFilter(_drop_orbax_info)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict, force: bool = False) -> None:
    """Saves `state` (a pytree of jax.Arrays, possibly sharded) and `meta` at `step`.

    With async_save this returns once the arrays are copied off the device, so the state
    may be donated to the next train step right away; the write finishes in the
    background. A step already on disk (e.g. the last step of a run resumed from it) is
    kept and not written again, unless `force`, which replaces it.
    """
    json.dumps(meta)  # fail here, not later in Orbax's background thread
    if step in self._manager.all_steps():
      if not force:
        logging.info('Checkpoint of step %d already in %s; not saving it again.',
                     step, self.directory)
        return
      self._manager.wait_until_finished()
      self._manager.delete(step)
    # force=True: save even where Orbax's own save-interval policy would skip the step.
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Returns `(state, meta)` of `step` (default: the latest).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (e.g.
    `jax.eval_shape` of the init plus the mesh shardings). Arrays are read straight into
    those shardings and dtypes, which may differ from the ones they were saved with.
    """
    self._manager.wait_until_finished()  # the step may have been saved moments ago, async
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'No checkpoint to restore in {self.directory}.')
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f'No checkpoint of step {step} in {self.directory}; '
                              f'it has steps {self.all_steps()}.')
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON record of `step` (default: the latest) alone, without reading the state."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint to read in {self.directory}.')
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def wait(self) -> None:
    """Blocks until a save still in flight is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
