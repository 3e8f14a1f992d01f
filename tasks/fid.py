"""Fréchet distance between Gaussians fitted to features (FID and its kin), and what a judged
metric needs: a frozen feature network and statistics of real data.

    mu, sigma = statistics(features)                  # [n, d] -> [d], [d, d]
    d = frechet_distance(mu, sigma, mu_ref, sigma_ref)

FID (Heusel et al., 2017) is this distance on pool3 features of the 2015-12-05 InceptionV3
(models/inception.py). The statistics files are the pytorch-fid / ADM `.npz` format: arrays `mu`
[d] and `sigma` [d, d] (ADM's reference batches also hold the images and spatial features, which
are ignored here). seam_sums / seam_ratio measure a patch generator's grid artefacts.
"""
from __future__ import annotations

import os

import numpy as np

JUDGE_STREAM = 0xF1D   # folded into the seed for the judged samples' noise
SEAM_REFERENCE_MAX = 10_000   # real images the seam ratio's reference reads at most (it settles
                              # within 0.005 by 1000 Fashion-MNIST images)


def seam_sums(images, period: int) -> np.ndarray:
  """[border sum, border pairs, interior sum, interior pairs] of the |differences| between
  neighbouring pixels of [n, H, W, c] images, along rows and columns with channels pooled; a
  pair is a border pair when it straddles a line of the period x period grid from the top-left
  corner. Sums, so that batches add up; seam_ratio turns them into the metric."""
  x = np.asarray(images, np.float32)   # exact for pixel values; the sums are float64
  out = np.zeros(4)
  for axis in (1, 2):
    d = np.abs(np.diff(x, axis=axis))
    border = (np.arange(x.shape[axis] - 1) % period) == period - 1
    across = np.take(d, np.flatnonzero(border), axis=axis)
    inside = np.take(d, np.flatnonzero(~border), axis=axis)
    out += [across.sum(dtype=np.float64), across.size, inside.sum(dtype=np.float64), inside.size]
  return out


def seam_ratio(sums) -> float:
  """How much more neighbouring pixels differ across the lines of a patch grid than inside its
  cells (from seam_sums): about 1 for images without a grid (real Fashion-MNIST gives 1.04 at
  period 4); a patch-based generator whose patches disagree at their edges scores above it.
  NaN when either kind of pair is absent or the images are flat inside the cells."""
  border, n_border, inside, n_inside = (float(v) for v in sums)
  if not (n_border and n_inside and inside):
    return float('nan')
  return (border / n_border) / (inside / n_inside)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased, as numpy's cov and pytorch-fid) covariance of [n, d] features, in
  float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'statistics need [n >= 2, d] features, got shape {x.shape}')
  mu = x.mean(0)
  centred = x - mu
  return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

  tr (S1 S2)^(1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
  A S2 A, A = S1^(1/2) (S1 S2 is similar to it): everything stays real and symmetric, so a
  singular covariance (fewer samples than feature dims, the usual case for small FID runs) needs
  no diagonal offset and gives no imaginary parts, where scipy's sqrtm of the non-symmetric
  product can fail to converge there.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape}')
  a = _psd_sqrt(sigma1)
  eig = np.linalg.eigvalsh(a @ sigma2 @ a)
  tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  d = np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
  return float(max(d, 0.0))   # rounding can leave -1e-12 for identical statistics


def save_stats(path: str, mu, sigma, **extra) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from a pytorch-fid / ADM .npz (ADM's reference batches included)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no reference statistics at {path}; compute them with '
                            f'`python tools/fid_stats.py ... --out={path}` or pass ADM\'s '
                            'reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)')
  with np.load(path) as f:
    missing = {'mu', 'sigma'} - set(f.files)
    if missing:
      raise ValueError(f'{path} has arrays {sorted(f.files)}; FID statistics need '
                       f'{sorted(missing)} too (the pytorch-fid / ADM format: mu [d], '
                       'sigma [d, d])')
    return np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64)


class SampleJudge:
  """How a generator's samples are judged during training and by `launch.py --mode=eval`.

  `features` is a frozen network (models.inception.FIDInception, or a classifier trained here:
  trainer.restore.TrainedClassifier) with `params`, `abstract_params()` and
  `features(params, pixels)` -> [b, d] features (or a dict with 'features' and, from a
  classifier, 'logits'), pixels being [b, H, W, c] in [0, 255]. Every `every` steps (and at the
  last) `num_samples` samples, classes spread evenly, are drawn with a fixed key, quantised to
  uint8 as a viewer would see them, and their features compared with `reference` (a statistics
  .npz) or, without one, with statistics of the run's own eval split (up to `reference_num`
  examples). Logged as eval/<name>; a classifier also gives eval/class_consistency, its accuracy
  on the samples against the labels they were drawn for, and, when the reference is the eval
  split (labelled real images), eval/real_accuracy (its accuracy on those images),
  eval/consistency_ratio (the first over the second) and eval/worst_class_ratio, the smallest
  per-class ratio (class k's consistency over its accuracy on real class-k images), with that
  class as eval/worst_class: a generator that drops a class shows there even when the mean is
  fine. With `seam_period` (a patch generator's patch size in pixels) it also logs
  eval/seam_ratio of the samples (seam_ratio: patch-grid artefacts) and, where the reference is
  the eval split, eval/real_seam_ratio of those real images for comparison.

  A feature network or reference that is absent does not stop training: `problem` says what is
  missing and the trainer warns once.
  """

  def __init__(self, features, num_samples: int, every: int = 0, name: str = 'fid',
               reference: str | None = None, reference_num: int = 50_000,
               batch_size: int = 0, seam_period: int = 0):
    """`features` is a zero-argument factory of the network (a fdl.Partial in experiments):
    `load()` calls it, outside the config's build, and a missing weights file or reference
    becomes `problem` rather than an error."""
    if num_samples < 2:
      raise ValueError(f'{name} needs FID_NUM >= 2 samples, got {num_samples}')
    self.features = features
    self.num_samples, self.every, self.name = num_samples, every, name
    self.reference, self.reference_num, self.batch_size = reference, reference_num, batch_size
    self.problem = None        # why this judge cannot run, or None
    self.net, self.reference_stats = None, None
    self.real_accuracy = None  # per class, on the reference images, when they are labelled
    self.seam_period = seam_period
    self.real_seam_ratio = None  # of the reference images, when they are the eval split

  def load(self) -> None:
    """The feature network and the reference statistics file, once; sets `problem` when either
    is missing."""
    if self.net is not None or self.problem is not None:
      return
    try:
      self.net = self.features()
      if self.reference is not None:
        self.reference_stats = load_stats(self.reference)
    except FileNotFoundError as e:
      self.net, self.problem = None, str(e)

  def due(self, step: int, last: bool) -> bool:
    return self.problem is None and (last or bool(self.every and step % self.every == 0))
