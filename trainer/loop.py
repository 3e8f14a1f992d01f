"""The training loop, top to bottom: mesh, state, restore, step, loop.

    run = fdl.build(config)            # model, task, data sources, optimizer, loop settings
    train(run, workdir)                # resumes from workdir's latest checkpoint by itself

Every process runs this same code on its own devices; each reads only its rows of the global
batch, only process 0 writes TensorBoard events, and Orbax coordinates the checkpoint writes.
Batches are prepared ahead on the host (Grain) and put on the devices ahead of their step by a
thread (trainer/prefetch.py); perf/input_wait_fraction is the share of the time the loop still
waited for them.

What survives what (docs/FAULTS.md has the full list): SIGTERM or SIGINT finishes the step,
saves and raises Stopped; a step with a non-finite loss or gradients changes nothing and is
counted, and max_bad_steps of them in a row stop the run; a damaged latest checkpoint is moved
aside and the previous one resumed; a checkpoint of another experiment or of other shapes is
refused; an evaluation or sampling failure is logged and training goes on.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from layers import sharding
from trainer import flops
from trainer import state as state_lib
from trainer import workdir as workdir_lib
from trainer.checkpoint import Checkpointer
from trainer.evaluation import Evaluator
from trainer.prefetch import Prefetcher
from trainer.restore import check_compatible, jsonable
from trainer.summaries import Summaries, image_grid, save_png, upscale_for

PREFETCH = 2   # batches put on the devices ahead of the step that takes them (trainer/prefetch.py)


class Stopped(Exception):
  """Training stopped on a signal after saving the checkpoint of `step`; rerunning resumes."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(f'stopped by {signal.Signals(signum).name} at step {step} after saving its '
                     'checkpoint; rerun the same command to resume')


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current step.

  With several processes they must all stop at the same step: JAX's distributed runtime already
  catches SIGTERM and `reached_preemption_sync_point` agrees on a step through its coordination
  service, with no device collective; SIGINT is passed on to it as SIGTERM. A second Ctrl-C
  interrupts at once."""

  def __init__(self):
    self.signum = None
    self.multi = jax.process_count() > 1
    self._previous = {}
    sigs = (signal.SIGINT,) if self.multi else (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread (a library caller): signals are theirs
        pass

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('%s received: finishing this step, saving a checkpoint, then stopping '
                    '(Ctrl-C again to interrupt at once)', signal.Signals(signum).name)
    if self.multi:
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_at(self, step: int) -> bool:
    if self.multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _ranges(rows) -> str:
  rows, parts, start = list(rows), [], None
  for i, r in enumerate(rows):
    start = r if start is None else start
    if i + 1 == len(rows) or rows[i + 1] != r + 1:
      parts.append(f'{start}-{r}' if r > start else f'{r}')
      start = None
  return ', '.join(parts)


def train(run, workdir: str, config_text: str = '', knobs: dict | None = None,
          on_start=None) -> dict:
  """Train `run` (a built RunConfig) in `workdir`; returns the last eval metrics.

  `knobs` (the experiment's knob values) are stored with each checkpoint and compared on
  resume; `on_start(step)` runs once the workdir's checkpoint is known to fit (launch.py
  records the invocation there). Raises Stopped after a signal, TrainError for what a user can
  fix (refused checkpoint, too many non-finite steps, bad data) and SaveError."""
  s = run.loop
  model, task, tx, lr_fn = run.model, run.task, run.optimizer.tx, run.optimizer.lr
  codec = run.codec       # a frozen VAE between the images and a latent model, or None
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh ----------------------
  try:
    mesh = sharding.make_mesh(s.mesh)
  except ValueError as e:
    raise state_lib.TrainError(f'{e}; set MESH to fit {jax.device_count()} devices, e.g. '
                               "--set \"MESH={'fsdp': -1}\"") from None
  rules = sharding.DEFAULT_RULES
  batch_sharding = state_lib.batch_sharding(mesh, s.global_batch)
  replicated = NamedSharding(mesh, P())
  grad_sync = state_lib.resolve_grad_sync(s.grad_sync, mesh)   # refused here, before anything
  logging.info('mesh %s over %d devices (%d processes), gradients summed by %s (GRAD_SYNC=%s)',
               dict(mesh.shape), mesh.size, jax.process_count(),
               'one flat all-reduce' if grad_sync == 'flat' else "XLA's partitioner", s.grad_sync)
  rows = state_lib.process_rows(batch_sharding, s.global_batch)
  logging.info('process %d of %d reads rows %s of each global batch of %d',
               jax.process_index(), jax.process_count(), _ranges(rows), s.global_batch)

  # ---------------------------------------------------------------- state ---------------------
  init_state = state_lib.make_init_state(model, task, tx, s.ema_decay)
  key = jax.random.key(s.seed)
  state_shardings, abstract = state_lib.shard_state(init_state, key, mesh, rules)
  param_specs = jax.tree_util.tree_leaves_with_path(state_shardings.params)
  sizes = [int(np.prod(a.shape)) for a in jax.tree.leaves(abstract.params)]
  (path, largest), _ = max(zip(param_specs, sizes), key=lambda t: t[1])
  logging.info('%d of %d parameter arrays sharded over fsdp; largest %s: %s',
               sum('fsdp' in str(sh.spec) for _, sh in param_specs), len(param_specs),
               jax.tree_util.keystr(path), largest.spec)

  if getattr(run, 'judge', None) is not None:
    run.judge.load()   # restoring a judging classifier must happen outside this run's mesh
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    ckpt = Checkpointer(workdir_lib.join(workdir, 'checkpoints'), keep=s.keep_ckpts)
    stack.callback(ckpt.close)   # waits for an async save still in flight
    check = lambda step, meta, saved: check_compatible(step, meta, saved, s.experiment, knobs,
                                                       abstract, ckpt.directory)
    state, meta, _ = ckpt.restore_latest(abstract, check)
    if state is not None:
      logging.info('Resuming from step %d (checkpoint in %s, data position %d).',
                   int(state.step), ckpt.directory, meta.get('data_position', -1))
    else:
      meta = {}
      state = state_lib.initialize(init_state, key, state_shardings)
      logging.info('Initialised %s parameters from seed %d.',
                   f'{state_lib.count_params(state.params):,}',
                   s.seed)
    skipped = int(meta.get('skipped_steps', 0))   # non-finite steps over the whole run
    if on_start is not None:
      on_start(int(state.step))

    # -------------------------------------------------------------- steps ---------------------
    frozen, frozen_shardings = state_lib.place_frozen(codec, mesh, rules)
    train_step = state_lib.make_train_step(model, task, tx, lr_fn, s.ema_decay, codec, mesh,
                                           grad_sync)
    train_step = jax.jit(train_step,
                         in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    decode = jax.jit(codec.decode) if codec is not None else lambda frozen, images: images

    state_lib.feed([run.train_data], batch_sharding, s.global_batch)
    to_global = lambda local: state_lib.to_global(batch_sharding, local, s.global_batch)

    writer = Summaries(workdir_lib.join(workdir, 'tensorboard'))
    start = int(state.step)
    if config_text and start == 0:
      writer.text('config', '```\n' + config_text + '\n```', 0)

    evaluator = Evaluator(run, mesh, frozen, writer)

    def sample(state, step):
      if not hasattr(task, 'samples'):
        return
      params = state.ema if s.ema_decay else state.params
      out = task.samples(model, params, jax.random.fold_in(jax.random.key(s.seed), step))
      path = lambda ext: workdir_lib.join(workdir, 'samples', f'step_{step}.{ext}')
      if 'images' in out:
        images = decode(frozen, out['images'])   # latents -> pixels with a codec
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        grid = image_grid(images, out['ncols'], value_range=(-1, 1),
                          scale=upscale_for(images.shape[1]),
                          row_labels=out.get('row_labels'))
        writer.image('samples', grid, step)
        if is_main:
          save_png(path('png'), grid)
      if 'text' in out:
        writer.text('samples', out['text'], step)
        if is_main:
          workdir_lib.write_text(path('txt'), out['text'])
        logging.info('step %d sample: %r', step, out['text'][:300])

    def guarded(what, step, fn, *args, **kwargs):
      """Evaluation and sampling run after the step's checkpoint is saved; if they fail, the
      traceback is logged and training goes on."""
      try:
        return fn(*args, **kwargs)
      except Exception:   # noqa: BLE001 -- anything: the checkpoint is safe, the run goes on
        logging.exception('%s at step %d failed; training goes on (the checkpoint of this step '
                          'is saved)', what, step)
        return None

    # -------------------------------------------------------------- loop ----------------------
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    counted = flops.counted_forward_flops(model, s.flops_per_example, s.tokens_per_example)[0]
    bar = tqdm(total=s.num_steps, initial=start, disable=not is_main, dynamic_ncols=True)
    stack.callback(bar.close)   # before an error's message, which must start its own line
    pending = None                      # (step, metrics) read one step late
    timer_step, timer, waited = start, time.perf_counter(), 0.0
    timed = {'s': 0.0, 'wait_s': 0.0, 'steps': 0}   # over the whole run, for the last line
    eval_metrics = {}

    def restart_timer(step):
      """The timed interval starts here: compilation, evaluation, sampling and saving stay out."""
      nonlocal timer_step, timer, waited
      timer_step, timer, waited = step, time.perf_counter(), batches.wait_s

    def log(step, metrics):
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != 'finite'}
      values = {f'learning/{k}': v for k, v in metrics.items()}
      values['learning/skipped_steps'] = skipped
      now = time.perf_counter()
      if step > timer_step:
        step_time = (now - timer) / (step - timer_step)
        # the time the loop was blocked waiting for its next batch, in the same interval
        wait = batches.wait_s - waited
        values['perf/input_wait_fraction'] = wait / (now - timer)
        timed['s'] += now - timer
        timed['wait_s'] += wait
        timed['steps'] += step - timer_step
        per_s = s.global_batch / step_time
        values['perf/step_time_s'] = step_time
        values['perf/examples_per_s'] = per_s
        if s.tokens_per_example:
          values['perf/tokens_per_s'] = per_s * s.tokens_per_example
        tflops = flops.train_tflops_per_device(counted, per_s, jax.device_count())
        values['perf/tflops_per_device'] = tflops
        if peak:
          values['perf/mfu'] = tflops / peak
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}', step_s=f'{step_time:.3f}')
      restart_timer(step)
      writer.scalars(values, step)

    bad = []   # the current run of consecutive non-finite steps

    def check_finite(step, metrics):
      """Reads a step's `finite` flag one step late (the next step is queued already)."""
      nonlocal skipped
      if bool(metrics['finite']):
        bad.clear()
        return
      skipped += 1
      bad.append(step)
      logging.warning('step %d: non-finite loss or gradients (loss %s, grad_norm %s); its '
                      'update was skipped (%d in a row, %d in this run)', step,
                      float(metrics['loss']), float(metrics['grad_norm']), len(bad), skipped)
      if len(bad) >= s.max_bad_steps:
        raise state_lib.TrainError(
            f'{len(bad)} consecutive steps ({bad[0]} to {step}) had a non-finite loss or '
            f'gradients (MAX_BAD_STEPS={s.max_bad_steps}); their updates were skipped, so the '
            f'parameters and every checkpoint stay finite. Lower the learning rate (LR, now '
            f'{float(metrics["lr"]):.3g} at this step) or a longer WARMUP, or check the data '
            'of those steps')

    check_batch = getattr(task, 'check_batch', None)

    def prepare(step, local):
      """Host batch -> global device arrays (the copy starts here), checked first."""
      if check_batch is not None:
        try:
          check_batch(model, local)
        except ValueError as e:
          raise state_lib.TrainError(f'training batch {step}: {e}') from None
      return to_global(local)

    signals = _StopSignals()
    stack.callback(signals.restore)
    stopped = None
    previous = None                     # (step, metrics) whose finite flag is still unread
    # host batches prepared ahead, in order, by Grain (closing stops its threads and worker
    # processes), then put on the devices ahead by a thread of ours (closed first)
    host = stack.enter_context(contextlib.closing(run.train_data.iterate(start, s.num_steps)))
    batches = stack.enter_context(Prefetcher(host, start, prepare, PREFETCH))
    for step in range(start, s.num_steps):
      state, metrics = train_step(state, next(batches), frozen)
      done = step + 1
      last = done == s.num_steps
      if previous is not None:
        check_finite(*previous)
      previous = (done, metrics)
      if step == start:   # keep compilation (and the first batch's wait) out of the timing
        jax.block_until_ready(metrics)
        restart_timer(done)
      if pending is not None:
        log(*pending)
        pending = None
      stop = signals.stop_at(done)
      if done % s.log_every == 0 or last or stop:
        pending = (done, metrics)
      bar.update(1)
      do_eval = (done % s.eval_every == 0 or last) and not stop
      do_judge = evaluator.judge_due(done, last) and not stop
      do_sample = ((s.sample_every and done % s.sample_every == 0) or last) and not stop
      do_save = done % s.ckpt_every == 0 or last or stop
      if do_eval or do_judge or do_sample or do_save:
        check_finite(*previous)
        previous = None
        if pending is not None:
          log(*pending)
          pending = None
        if do_save:   # first: an evaluation that fails must not cost the checkpoint
          ckpt.save(done, state, {'step': done, 'data_position': done,
                                  'experiment': s.experiment, 'skipped_steps': skipped,
                                  'knobs': jsonable(knobs or {})})
        if do_eval or do_judge:
          eval_metrics = guarded('evaluation', done, evaluator,
                                 state.ema if s.ema_decay else state.params, done,
                                 split=do_eval, judge=do_judge) or eval_metrics
        if do_sample:
          guarded('sampling', done, sample, state, done)
        jax.block_until_ready(state)  # eval, samples and saves stay out of the timed interval
        restart_timer(done)
      if stop:
        stopped = Stopped(signals.signum, done)
        logging.warning('%s', stopped)
        break
    if previous is not None:
      check_finite(*previous)
    bar.close()   # the last step is always a boundary, so nothing is left pending
    if start >= s.num_steps:
      logging.info('Nothing to do: the checkpoint is already at step %d of %d.', start,
                   s.num_steps)
    elif timed['steps']:
      logging.info('%d timed steps took %.1f s, %.3f s per step; the loop waited for input '
                   '%.1f%% of that time (perf/input_wait_fraction %.4f, prefetch %d)',
                   timed['steps'], timed['s'], timed['s'] / timed['steps'],
                   100 * timed['wait_s'] / timed['s'], timed['wait_s'] / timed['s'],
                   PREFETCH)
    writer.close()
  if stopped is not None:   # raised after the ExitStack: the checkpoint is on disk by now
    raise stopped
  return eval_metrics
