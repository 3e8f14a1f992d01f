"""The Fréchet distance and feature statistics (tasks/fid.py) against independent computations."""
import numpy as np
import pytest
import scipy.linalg

from tasks import fid


def random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0 if rank else 1e-3 * np.eye(d))


def scipy_fd(mu1, s1, mu2, s2):
  """pytorch-fid's route: sqrtm of the non-symmetric product, real part."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(covmean.real))


def test_diagonal_covariances_match_the_closed_form():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize('d', [3, 64])
def test_random_spd_matrices_match_scipy_sqrtm(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = random_spd(rng, d), random_spd(rng, d)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fd(mu1, s1, mu2, s2),
                                                                 rel=1e-8)
  # symmetric in its two arguments, zero against itself, the mean term alone for equal sigmas
  assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(
      fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-8)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9 * d)
  assert fid.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(
      np.square(mu1 - mu2).sum(), rel=1e-8)


def test_singular_covariances_are_stable():
  """Fewer samples than dims (the small-FID case): rank-deficient sigmas. The result is finite,
  non-negative, zero for identical statistics, and agrees with scipy's route after pytorch-fid's
  diagonal offset to the tolerance that offset allows."""
  rng = np.random.default_rng(1)
  d = 128
  x = rng.normal(size=(40, d))
  y = rng.normal(size=(40, d)) * 1.5 + 0.3
  mu1, s1 = fid.statistics(x)
  mu2, s2 = fid.statistics(y)
  assert np.linalg.matrix_rank(s1) < d
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  offset = 1e-6 * np.eye(d)
  reference = scipy_fd(mu1, s1 + offset, mu2, s2 + offset)
  assert np.isfinite(got) and got > 0
  assert got == pytest.approx(reference, rel=1e-4)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
  # rank 1 and the zero matrix
  v = rng.normal(size=(d, 1))
  assert fid.frechet_distance(mu1, v @ v.T, mu1, np.zeros((d, d))) == pytest.approx(
      float(np.square(v).sum()), rel=1e-10)


def test_statistics_match_numpy():
  x = np.random.default_rng(2).normal(size=(50, 7)).astype(np.float32)
  mu, sigma = fid.statistics(x)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
  assert mu.dtype == sigma.dtype == np.float64
  with pytest.raises(ValueError, match=r'\[n >= 2, d\] features, got shape \(1, 7\)'):
    fid.statistics(x[:1])


def test_statistics_files_in_the_adm_format(tmp_path):
  rng = np.random.default_rng(3)
  mu, sigma = rng.normal(size=4), random_spd(rng, 4)
  # ADM's reference batches hold the images and spatial statistics too
  np.savez(tmp_path / 'adm.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma,
           mu_s=mu[:2], sigma_s=sigma[:2, :2])
  got_mu, got_sigma = fid.load_stats(str(tmp_path / 'adm.npz'))
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  fid.save_stats(str(tmp_path / 'sub' / 'ours.npz'), mu, sigma)
  np.testing.assert_array_equal(fid.load_stats(str(tmp_path / 'sub' / 'ours.npz'))[1], sigma)
  np.savez(tmp_path / 'bad.npz', arr_0=np.zeros(3))
  with pytest.raises(ValueError, match=r"has arrays \['arr_0'\]; FID statistics need \['mu', "
                                       r"'sigma'\]"):
    fid.load_stats(str(tmp_path / 'bad.npz'))
  with pytest.raises(FileNotFoundError, match='no reference statistics at .*tools/fid_stats.py'):
    fid.load_stats(str(tmp_path / 'absent.npz'))
  with pytest.raises(ValueError, match=r'different dimensions: mu \(4,\) vs \(3,\)'):
    fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_judge_reports_a_missing_network_instead_of_failing():
  def absent():
    raise FileNotFoundError('no Inception weights at w.npz')
  judge = fid.SampleJudge(absent, num_samples=4, every=10)
  judge.load()
  assert judge.problem == 'no Inception weights at w.npz'
  assert not judge.due(10, last=True)
  ready = fid.SampleJudge(lambda: object(), num_samples=4, every=10)
  ready.load()
  assert ready.problem is None
  assert [s for s in range(1, 26) if ready.due(s, last=s == 25)] == [10, 20, 25]
  once = fid.SampleJudge(lambda: object(), num_samples=4)
  once.load()
  assert [s for s in range(1, 31) if once.due(s, last=s == 30)] == [30]
  with pytest.raises(ValueError, match='needs FID_NUM >= 2 samples, got 1'):
    fid.SampleJudge(absent, num_samples=1)


@pytest.mark.parametrize('p, a, b', [(4, 9.0, 1.0), (4, 1.0, 1.0), (2, 0.5, 2.0)])
def test_seam_ratio_of_a_ramp_with_steps_at_the_grid_lines_is_closed_form(p, a, b):
  """x[i, j] = a * (j // p) + b * (j % p): rows step by b inside a cell and by a - (p - 1) b
  across a grid line; columns are flat. Pooled over both directions, with as many border (and
  as many interior) pairs along rows as along columns, the ratio is |a - (p - 1) b| / b."""
  n = 4 * p
  j = np.arange(n)
  image = np.broadcast_to(a * (j // p) + b * (j % p), (n, n))[None, :, :, None]
  assert fid.seam_ratio(fid.seam_sums(image, p)) == pytest.approx(abs(a - (p - 1) * b) / b)


def test_seam_ratio_is_one_without_a_grid_and_sums_add_over_batches():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 64, (64, 28, 28, 1))
  whole = fid.seam_sums(noise, 4)
  assert fid.seam_ratio(whole) == pytest.approx(1.0, abs=0.02)
  np.testing.assert_allclose(fid.seam_sums(noise[:10], 4) + fid.seam_sums(noise[10:], 4), whole)
  # per-patch offsets, as a patch generator whose patches disagree makes, raise it
  offsets = np.kron(rng.normal(0, 40, (64, 7, 7)), np.ones((4, 4)))[..., None]
  assert fid.seam_ratio(fid.seam_sums(noise + offsets, 4)) > 1.5
  # the same offsets on a grid of another period are not seams of this one
  shifted = np.roll(noise + offsets, 2, axis=(1, 2))
  assert fid.seam_ratio(fid.seam_sums(shifted, 4)) < fid.seam_ratio(fid.seam_sums(
      noise + offsets, 4))
  assert np.isnan(fid.seam_ratio(fid.seam_sums(np.zeros((2, 8, 8, 1)), 4)))
