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

Faults: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
crash or a full disk mid-save leaves the previous steps as they were (the unfinished directory
is ignored, and replaced when that step is saved again). A save that fails raises SaveError.
`restore_latest` reads the newest step that restores cleanly; a step that does not (a file
deleted or truncated, an empty directory) is moved aside to `<directory>.corrupt/`, never
deleted, with a warning naming it.
"""
from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import re
import sys
import time

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from trainer import workdir as workdir_lib


# What the OS said, when a storage library's message hides it among a long spec
_OS_REASON = re.compile(r'No space left on device|File too large|Permission denied|'
                        r'Read-only file system|Disk quota exceeded')
# How tensorstore reports a failed file operation inside the ValueError it raises.
_IO_ERROR = re.compile(r'os_error_code|PERMISSION_DENIED|RESOURCE_EXHAUSTED|Error writing|'
                       + _OS_REASON.pattern)


def _reason(e: BaseException) -> str:
  """The first line of a failed write's message, cut to 400 characters, and the OS's reason
  in front of it when that line, or the cut, drops it."""
  line = str(e).splitlines()[0] if str(e) else type(e).__name__
  short = line if len(line) <= 400 else f'{line[:200]} ... {line[-200:]}'
  reason = _OS_REASON.search(str(e))
  return f'{reason.group(0)}: {short}' if reason and reason.group(0) not in short else short


class SaveError(OSError):
  """A checkpoint could not be written (disk full, no permission, ...); earlier ones are intact."""


def _drop_orbax_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


# When one tensorstore write of a save fails, Orbax's gather gives up and closes its event loop
# while the save's other writes are still in flight. Each of those then reports itself twice
# more: asyncio logs "Task exception was never retrieved" with its own copy of the I/O error, and
# tensorstore, finding the loop closed, prints an unraisable "Event loop is closed" traceback.
# A 1 MB checkpoint made hundreds of lines that buried SaveError's one line (and, printed from
# another thread, could split it). SaveError says it all once, so both echoes are dropped; any
# other unraisable or asyncio error still reaches the user.
def _drop_failed_write_echo(record: py_logging.LogRecord) -> bool:
  exc = record.exc_info[1] if record.exc_info else None
  return not (isinstance(exc, (OSError, ValueError)) and _IO_ERROR.search(str(exc)))


def _quiet_closed_loop(hook):
  def quiet(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'):
      hook(unraisable)
  quiet.drops_closed_loop = True
  return quiet


def _quiet_failed_writes():
  asyncio_logger = py_logging.getLogger('asyncio')
  if _drop_failed_write_echo not in asyncio_logger.filters:
    asyncio_logger.addFilter(_drop_failed_write_echo)
  if not getattr(sys.unraisablehook, 'drops_closed_loop', False):
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager`; the training loop decides when to save."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # Orbax wants absolute paths, and a relative one would resolve against each process's
    # own working directory; URLs (gs://...) stay as they are.
    self.directory = workdir_lib.resolve(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    # Orbax logs dozens of INFO lines per save through absl's one logger; keep its warnings only.
    absl_logger = py_logging.getLogger('absl')
    if _drop_orbax_info not in absl_logger.filters:
      absl_logger.addFilter(_drop_orbax_info)
    _quiet_failed_writes()
    self._last_saved = None
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
    self._last_saved = step
    with self._saving(step):
      self._manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta)),
          force=True)

  @contextlib.contextmanager
  def _saving(self, step):
    """Turns a failed write (here, or surfacing from the background thread of an earlier async
    save) into SaveError naming the directory and the steps still intact."""
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      if isinstance(e, SaveError) or not (isinstance(e, OSError) or _IO_ERROR.search(str(e))):
        raise
      step = self._last_saved if step is None else step   # an async save failing late
      intact = [s for s in self.all_steps() if s != step]
      what = 'the checkpoint' if step is None else f'the checkpoint of step {step}'
      line = _reason(e)
      raise SaveError(
          f'writing {what} to {self.directory} failed ({line}); '
          f'{f"steps {intact} are intact" if intact else "no earlier checkpoint exists"}. '
          'Free disk space or fix the permissions, then rerun the same command to resume.'
      ) from e

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

  def saved_tree(self, step: int):
    """Orbax's metadata tree of `step`'s state (shapes and dtypes; no array is read)."""
    saved = self._manager.item_metadata(step)['state']
    return saved.tree if hasattr(saved, 'tree') else saved

  def restore_latest(self, abstract_state, check=None):
    """(state, meta, step) of the newest step that restores cleanly, or (None, None, None) when
    there is none. `check(step, meta, saved_tree)` (saved_tree: Orbax's metadata of the state,
    shapes and dtypes only) runs first and may refuse the checkpoint by raising; anything a
    damaged step raises while being read instead moves that step aside, and the next older one
    is tried."""
    self._manager.wait_until_finished()
    while (step := self.latest_step()) is not None:
      try:
        meta = self.read_meta(step)
        saved = self.saved_tree(step)
      except Exception as e:   # noqa: BLE001 -- whatever a damaged step raises
        self._quarantine(step, e)
        continue
      if check is not None:
        check(step, meta, saved)
      try:
        state, meta = self.restore(abstract_state, step)
      except Exception as e:   # noqa: BLE001
        self._quarantine(step, e)
        continue
      return state, meta, step
    return None, None, None

  def _quarantine(self, step: int, error: Exception) -> None:
    aside = epath.Path(self.directory + '.corrupt')
    target = aside / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    logging.warning('checkpoint of step %d in %s cannot be restored (%s: %s); moving it to %s '
                    'and trying the previous one', step, self.directory, type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else '', target)
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until a save still in flight is on disk."""
    with self._saving(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._saving(None):
      self._manager.close()
