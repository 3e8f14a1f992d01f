"""The training loop, top to bottom: mesh, state, restore, step, loop.

    run = fdl.build(config)            # model, task, data sources, optimizer, loop settings
    train(run, workdir)                # resumes from workdir's latest checkpoint by itself

Every process runs this same code on its own devices; each reads only its rows of the global
batch, only process 0 writes TensorBoard events, and Orbax coordinates the checkpoint writes.
"""
from __future__ import annotations

import contextlib
import os
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
from trainer.checkpoint import Checkpointer
from trainer.evaluation import Evaluator
from trainer.summaries import Summaries, image_grid, save_png


def train(run, workdir: str, config_text: str = '') -> dict:
  """Train `run` (a built RunConfig) in `workdir`; returns the last eval metrics."""
  s = run.loop
  model, task, tx, lr_fn = run.model, run.task, run.optimizer.tx, run.optimizer.lr
  codec = run.codec       # a frozen VAE between the images and a latent model, or None
  is_main = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh ----------------------
  mesh = sharding.make_mesh(s.mesh)
  rules = sharding.DEFAULT_RULES
  batch_sharding = state_lib.batch_sharding(mesh, s.global_batch)
  replicated = NamedSharding(mesh, P())
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size,
               jax.process_count())

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
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=s.keep_ckpts)
    stack.callback(ckpt.close)   # waits for an async save still in flight
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(abstract)
      logging.info('Resuming from step %d (checkpoint in %s, data position %d).',
                   int(state.step), ckpt.directory, meta.get('data_position', -1))
      if meta.get('experiment') not in (None, s.experiment):
        logging.warning('workdir checkpoint came from experiment %s, not %s',
                        meta.get('experiment'), s.experiment)
    else:
      state = state_lib.initialize(init_state, key, state_shardings)
      logging.info('Initialised %s parameters from seed %d.',
                   f'{state_lib.count_params(state.params):,}',
                   s.seed)

    # -------------------------------------------------------------- steps ---------------------
    frozen, frozen_shardings = state_lib.place_frozen(codec, mesh, rules)
    train_step = state_lib.make_train_step(model, task, tx, lr_fn, s.ema_decay, codec)
    train_step = jax.jit(train_step,
                         in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    decode = jax.jit(codec.decode) if codec is not None else lambda frozen, images: images

    def to_global(local):
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)), local)

    writer = Summaries(os.path.join(workdir, 'tensorboard'))
    start = int(state.step)
    if config_text and start == 0:
      writer.text('config', '```\n' + config_text + '\n```', 0)

    evaluator = Evaluator(run, mesh, frozen, writer)

    def sample(state, step):
      if not hasattr(task, 'samples'):
        return
      params = state.ema if s.ema_decay else state.params
      out = task.samples(model, params, jax.random.fold_in(jax.random.key(s.seed), step))
      os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
      if 'images' in out:
        images = decode(frozen, out['images'])   # latents -> pixels with a codec
        images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
        grid = image_grid(images, out['ncols'], value_range=(-1, 1))
        writer.image('samples', grid, step)
        if is_main:
          save_png(os.path.join(workdir, 'samples', f'step_{step}.png'), grid)
      if 'text' in out:
        writer.text('samples', out['text'], step)
        if is_main:
          with open(os.path.join(workdir, 'samples', f'step_{step}.txt'), 'w') as f:
            f.write(out['text'])
        logging.info('step %d sample: %r', step, out['text'][:300])

    # -------------------------------------------------------------- loop ----------------------
    peak = flops.peak_tflops(jax.devices()[0].device_kind)
    bar = tqdm(total=s.num_steps, initial=start, disable=not is_main, dynamic_ncols=True)
    pending = None                      # (step, metrics) read one step late
    timer_step, timer = start, time.perf_counter()
    eval_metrics = {}

    def log(step, metrics):
      nonlocal timer_step, timer
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      values = {f'learning/{k}': v for k, v in metrics.items()}
      now = time.perf_counter()
      if step > timer_step:
        step_time = (now - timer) / (step - timer_step)
        per_s = s.global_batch / step_time
        values['perf/step_time_s'] = step_time
        values['perf/examples_per_s'] = per_s
        if s.tokens_per_example:
          values['perf/tokens_per_s'] = per_s * s.tokens_per_example
        tflops = flops.train_tflops_per_device(s.flops_per_example, per_s, jax.device_count())
        values['perf/tflops_per_device'] = tflops
        if peak:
          values['perf/mfu'] = tflops / peak
        bar.set_postfix(loss=f'{metrics["loss"]:.4f}', step_s=f'{step_time:.3f}')
      timer_step, timer = step, now
      writer.scalars(values, step)

    # prepared ahead, in order; closing stops Grain's threads and worker processes
    batches = stack.enter_context(contextlib.closing(run.train_data.iterate(start, s.num_steps)))
    for step in range(start, s.num_steps):
      batch = to_global(next(batches))
      state, metrics = train_step(state, batch, frozen)
      done = step + 1
      last = done == s.num_steps
      if step == start:   # keep compilation out of the timed interval
        jax.block_until_ready(metrics)
        timer_step, timer = done, time.perf_counter()
      if pending is not None:
        log(*pending)
        pending = None
      if done % s.log_every == 0 or last:
        pending = (done, metrics)
      bar.update(1)
      do_eval = done % s.eval_every == 0 or last
      do_judge = evaluator.judge_due(done, last)
      do_sample = (s.sample_every and done % s.sample_every == 0) or last
      do_save = done % s.ckpt_every == 0 or last
      if do_eval or do_judge or do_sample or do_save:
        if pending is not None:
          log(*pending)
          pending = None
        if do_save:   # first: an evaluation that fails must not cost the checkpoint
          ckpt.save(done, state, {'step': done, 'data_position': done,
                                  'experiment': s.experiment})
        if do_eval or do_judge:
          eval_metrics = evaluator(state.ema if s.ema_decay else state.params, done,
                                   split=do_eval, judge=do_judge)
        if do_sample:
          sample(state, done)
        jax.block_until_ready(state)  # eval, samples and saves stay out of the timed interval
        timer_step, timer = done, time.perf_counter()
    bar.close()   # the last step is always a boundary, so nothing is left pending
    if start >= s.num_steps:
      logging.info('Nothing to do: the checkpoint is already at step %d of %d.', start,
                   s.num_steps)
    writer.close()
    return eval_metrics
