"""Evaluation of a set of parameters: what the loop logs under eval/ and `launch.py --mode=eval`
prints.

  - the task's metrics over the eval split (or its first EVAL_BATCHES batches): every example
    exactly once across all processes, the last batch padded and masked;
  - for a generator with a judge (tasks/fid.py): FID, or the Fréchet distance on a classifier's
    features plus that classifier's accuracy on the samples, every judge.every steps;
  - for a language model: continuations of held-out prompts, as text.

Every process runs the same calls on its own devices; only process 0 writes events.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from tasks import fid
from tasks.common import pixels_to_float
from trainer import sampling
from trainer import state as state_lib

TEXT_PROMPTS = 4     # held-out prompts continued at each evaluation of a language model


def quantize(images):
  """[-1, 1] floats -> the uint8 values a saved PNG holds, as float32 in [0, 255] (the judge sees
  what a viewer would)."""
  return jnp.round(jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1) * 255)


def per_class_mean(values, labels, num_classes: int) -> np.ndarray:
  """[num_classes] means of `values` over each class's examples (NaN for a class without any)."""
  sums = np.bincount(labels, weights=values.astype(np.float64), minlength=num_classes)
  counts = np.bincount(labels, minlength=num_classes)
  with np.errstate(invalid='ignore', divide='ignore'):
    return sums / counts


def consistency_ratios(consistency, real_accuracy, overall: float) -> dict:
  """The judge's accuracy on samples against its accuracy on real images, overall (the real
  accuracy averaged over the sampled classes, which spread_labels draws equally often) and for
  the worst class among those sampled that it ever recognises in real images (a ratio over 0
  is undefined: NaN, worst_class -1)."""
  real_overall = float(np.nanmean(np.where(np.isnan(consistency), np.nan, real_accuracy)))
  defined = ~np.isnan(consistency) & (real_accuracy > 0)
  ratios = np.where(defined, consistency / np.where(defined, real_accuracy, 1), np.inf)
  worst = int(np.argmin(ratios)) if defined.any() else -1
  return {'real_accuracy': real_overall,
          'consistency_ratio': overall / real_overall if real_overall > 0 else float('nan'),
          'worst_class_ratio': float(ratios[worst]) if worst >= 0 else float('nan'),
          'worst_class': worst}


class Evaluator:
  """evaluator(params, step) -> {metric: value}; writes eval/* to `writer` when given."""

  def __init__(self, run, mesh, frozen=None, writer=None):
    self.run, self.mesh, self.frozen, self.writer = run, mesh, frozen, writer
    s = run.loop
    self.batch_sharding = state_lib.batch_sharding(mesh, s.global_batch)
    state_lib.feed([getattr(run, 'eval_data', None)], self.batch_sharding, s.global_batch)
    self.eval_step = jax.jit(state_lib.make_eval_step(run.model, run.task, run.codec),
                             out_shardings=NamedSharding(mesh, P()))
    self.judge = getattr(run, 'judge', None)
    self._judge_ready = False
    if self.judge is not None:
      self.judge.load()
      if self.judge.problem is None:
        try:   # at the start, so that a judge that cannot work is known before training
          self._prepare_judge()
        except state_lib.TrainError as e:
          self.judge.problem = str(e)
      if self.judge.problem:
        logging.warning('eval/%s is off for this run: %s', self.judge.name, self.judge.problem)
    self._text = hasattr(run.task, 'continue_prompts') and getattr(run, 'eval_data', None)

  # ------------------------------------------------------------------ the eval split ---------
  def split_metrics(self, params) -> dict:
    s, source = self.run.loop, self.run.eval_data
    n = source.num_eval_batches()
    n = min(n, s.eval_batches) if s.eval_batches else n
    sums = None
    check = getattr(self.run.task, 'check_batch', None)
    with contextlib.closing(source.iterate(0, n)) as batches:
      for i, batch in enumerate(batches):
        if check is not None:
          try:
            check(self.run.model, batch)
          except ValueError as e:
            raise state_lib.TrainError(f'eval batch {i}: {e}') from None
        batch = state_lib.to_global(self.batch_sharding, batch, s.global_batch)
        out = jax.device_get(self.eval_step(params, batch, self.frozen, i))
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    self.split_batches = n
    return self.run.task.finalize(sums)

  # ------------------------------------------------------------------ judged samples ---------
  def _prepare_judge(self):
    """Places the judge's network on the mesh and, without a statistics file, computes the
    reference statistics from the eval split: once per run."""
    if self._judge_ready:
      return
    judge = self.judge
    self.judge_params, _ = state_lib.place_frozen(judge.net, self.mesh)
    net = judge.net
    # eval-split images arrive as uint8, samples as floats: both are quantised from [-1, 1]
    self._features = jax.jit(lambda p, x: _as_dict(net.features(p, quantize(pixels_to_float(x)))))
    if judge.reference_stats is None:
      judge.reference_stats = self._reference_stats()
    self._judge_ready = True

  def _reference_stats(self):
    judge, source = self.judge, self.run.eval_data
    batches = min(source.num_eval_batches(), -(-judge.reference_num // source.global_batch))
    feats, hits, labels = [], [], []
    seams, seen = np.zeros(4), 0
    with contextlib.closing(source.iterate(0, batches)) as it:
      for batch in it:
        if 'image' not in batch:
          raise state_lib.TrainError(
              'the eval data holds no images (pre-encoded latents?) to compute reference '
              'statistics from; pass a statistics file: FID_REF=PATH (tools/fid_stats.py makes '
              'one from the image dataset)')
        labelled = {k: batch[k] for k in ('mask', 'label') if k in batch}
        x, labelled = state_lib.to_global(self.batch_sharding, (batch['image'], labelled),
                                          source.global_batch)
        out, labelled = (jax.tree.map(lambda a: np.asarray(
            multihost_utils.process_allgather(a, tiled=True)), o)
            for o in (self._features(self.judge_params, x), labelled))
        real = labelled['mask'] > 0
        feats.append(out['features'][real])
        wanted = min(judge.reference_num, fid.SEAM_REFERENCE_MAX) - seen
        if judge.seam_period and wanted > 0:
          images = np.asarray(multihost_utils.process_allgather(x, tiled=True))[real][:wanted]
          seams += fid.seam_sums(images, judge.seam_period)
          seen += len(images)
        if 'logits' in out and 'label' in labelled:
          labels.append(labelled['label'][real])
          hits.append(out['logits'].argmax(-1)[real] == labels[-1])
    feats = np.concatenate(feats)[:judge.reference_num]
    logging.info('eval/%s reference: statistics of %d eval-split images', judge.name,
                 len(feats))
    if judge.seam_period:
      judge.real_seam_ratio = fid.seam_ratio(seams)
    if labels:
      judge.real_accuracy = per_class_mean(np.concatenate(hits)[:judge.reference_num],
                                           np.concatenate(labels)[:judge.reference_num],
                                           self.run.task.num_classes)
    return fid.statistics(feats)

  def sample_metrics(self, params) -> dict:
    """The judge's metrics on judge.num_samples samples drawn with a fixed key (the same noise
    at every evaluation, so successive values differ by the model alone)."""
    self._prepare_judge()
    judge, run = self.judge, self.run
    labels = sampling.spread_labels(judge.num_samples, run.task.num_classes)
    batch = sampling.batch_size_for(self.mesh, judge.num_samples,
                                    judge.batch_size or run.loop.global_batch)
    decode = getattr(self, '_decode', None)
    if decode is None and run.codec is not None:
      decode = self._decode = jax.jit(run.codec.decode)
    key = jax.random.fold_in(jax.random.key(run.loop.seed), fid.JUDGE_STREAM)
    feats, logits, seams = [], [], np.zeros(4)
    for x, n in sampling.draw_images(run, params, self.frozen, labels, key, self.mesh, batch,
                                     decode, desc=f'eval/{judge.name}: {judge.num_samples} '
                                     'samples'):
      out = jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)),
                         self._features(self.judge_params, x))
      feats.append(out['features'][:n])
      if judge.seam_period:   # on the pixels a viewer sees, as the judge does
        pixels = np.asarray(multihost_utils.process_allgather(
            quantize(x).astype(jnp.uint8), tiled=True))[:n]
        seams += fid.seam_sums(pixels, judge.seam_period)
      if 'logits' in out:
        logits.append(out['logits'][:n])
    mu, sigma = fid.statistics(np.concatenate(feats))
    metrics = {judge.name: fid.frechet_distance(mu, sigma, *judge.reference_stats)}
    if judge.seam_period:
      metrics['seam_ratio'] = fid.seam_ratio(seams)
      if judge.real_seam_ratio is not None:
        metrics['real_seam_ratio'] = judge.real_seam_ratio
    if logits:
      hits = np.concatenate(logits).argmax(-1) == labels
      metrics['class_consistency'] = float(hits.mean())
      if judge.real_accuracy is not None:
        per_class = per_class_mean(hits, labels, run.task.num_classes)
        metrics.update(consistency_ratios(per_class, judge.real_accuracy,
                                          metrics['class_consistency']))
        logging.info('eval/class_consistency per class (samples / real images): %s', ', '.join(
            f'{k} {c:.2f}/{r:.2f}' for k, (c, r) in enumerate(zip(per_class, judge.real_accuracy))
            if not np.isnan(c)))
    return metrics

  # ------------------------------------------------------------------ text ------------------
  def continuations(self, params, step) -> str:
    key = jax.random.fold_in(jax.random.key(self.run.loop.seed), step)
    records = sampling.continue_held_out(self.run, params, TEXT_PROMPTS, key, self.mesh)
    return '\n\n'.join(f'**{r["prompt"]!r}** → {r["continuation"]!r}' for r in records)

  # ------------------------------------------------------------------ all ---------------------
  def judge_due(self, step: int, last: bool) -> bool:
    return self.judge is not None and self.judge.due(step, last)

  def __call__(self, params, step: int, split: bool = True, judge: bool = True) -> dict:
    """The split's metrics (with `split`), the judge's (with `judge`, where the run has a usable
    one) and held-out continuations (language models, with `split`), logged at `step`."""
    metrics = self.split_metrics(params) if split else {}
    if judge and self.judge is not None and self.judge.problem is None:
      metrics.update(self.sample_metrics(params))
    if self.writer is not None:
      self.writer.scalars({f'eval/{k}': v for k, v in metrics.items()}, step)
    if split and self._text:
      text = self.continuations(params, step)
      if self.writer is not None:
        self.writer.text('eval/continuations', text, step)
      logging.info('step %d held-out continuations:\n%s', step, text)
    if metrics:
      ema = ', EMA' if self.run.loop.ema_decay else ''
      where = f'{self.split_batches} batches' if split else 'samples only'
      logging.info('step %d eval (%s%s): %s', step, where, ema,
                   ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))
    return metrics


def _as_dict(out):
  return out if isinstance(out, dict) else {'features': out}
