"""Objectives against closed forms and NumPy: flow matching, Euler + CFG, losses, decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from models.gpt import GPT
from tasks import common, diffusion
from tasks.classification import Classification
from tasks.language import LanguageModeling, generate, sample_logits


class _TrueVelocity:
  """Stands in for a model when every data point equals `m`: then x0 is recoverable from x_t
  and the exact velocity is known in closed form."""

  def __init__(self, m):
    self.m = m

  def apply(self, variables, x_t, t, y):
    t = t[:, None, None, None]
    x0 = (x_t - t * self.m) / (1 - (1 - diffusion.SIGMA_MIN) * t)
    return self.m - (1 - diffusion.SIGMA_MIN) * x0


def test_flow_matching_loss_is_zero_for_true_velocity():
  m = jnp.linspace(-1, 1, 4 * 4 * 3).reshape(1, 4, 4, 3)
  batch = {'image': jnp.broadcast_to(m, (16, 4, 4, 3)), 'label': jnp.zeros((16,), jnp.int32)}
  task = diffusion.FlowMatching(num_classes=10, denoise_timesteps=32, class_dropout_prob=0.5)
  loss, _ = task.loss(_TrueVelocity(m), None, batch, jax.random.key(0))
  assert float(loss) < 1e-9
  # a model that is off by 0.1 everywhere pays exactly 0.01
  class Off(_TrueVelocity):
    def apply(self, *a):
      return super().apply(*a) + 0.1
  loss, _ = task.loss(Off(m), None, batch, jax.random.key(0))
  np.testing.assert_allclose(loss, 0.01, rtol=1e-4)


class _RecordsTime:
  """A velocity model that records the times it is queried at (called outside jit)."""

  def __init__(self):
    self.seen = []

  def apply(self, variables, x_t, t, y):
    self.seen.append(np.asarray(t))
    return jnp.zeros_like(x_t)


@pytest.mark.parametrize('how', ['uniform', 'logit_normal', 'grid'])
def test_training_times_reach_the_model_as_configured(how):
  # continuous t: the model sees times off the sampler's grid, so any number of sampling steps
  # queries times it was trained on; 'grid' keeps the old draw from {k / N}
  n = 8
  task = diffusion.FlowMatching(num_classes=10, denoise_timesteps=n, t_sampling=how)
  model = _RecordsTime()
  batch = {'image': jnp.zeros((512, 2, 2, 1)), 'label': jnp.zeros((512,), jnp.int32)}
  task.loss(model, None, batch, jax.random.key(0))
  t = model.seen[0]
  assert t.shape == (512,) and t.dtype == np.float32 and (t >= 0).all() and (t < 1).all()
  off_grid = np.abs(t * n - np.round(t * n)) > 1e-4
  if how == 'grid':
    assert not off_grid.any() and len(np.unique(t)) == n
  else:
    assert off_grid.mean() > 0.95
    # uniform: mean 1/2, variance 1/12; logit-normal: symmetric about 1/2, fewer draws near the
    # ends (P(t < 0.1) = Phi(logit 0.1) = 0.014 against 0.1)
    assert abs(t.mean() - 0.5) < 0.05
    near_end = (t < 0.1).mean()
    assert (0.06 < near_end < 0.14) if how == 'uniform' else near_end < 0.04
  with pytest.raises(ValueError, match='logit_normal'):
    diffusion.FlowMatching(num_classes=10, t_sampling='beta')
  with pytest.raises(ValueError, match='heun'):
    diffusion.FlowMatching(num_classes=10, sampler='rk4')


def test_eval_noise_differs_between_batches_and_repeats_per_batch():
  from trainer import state as state_lib
  task = diffusion.FlowMatching(num_classes=10, denoise_timesteps=8)
  m = jnp.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
  batch = {'image': jnp.broadcast_to(m, (4, 2, 2, 3)), 'label': jnp.zeros((4,), jnp.int32)}

  class Zero:
    def apply(self, variables, x_t, t, y):
      return jnp.zeros_like(x_t)

  step = jax.jit(state_lib.make_eval_step(Zero(), task))
  first, again, second = (float(step(None, batch, None, i)['loss_sum']) for i in (0, 0, 1))
  assert first == again and first != second


def test_weight_decay_per_step_is_lr_times_the_knob():
  # with zero gradients Adam's update is 0, so a step changes a decayed weight by exactly
  # -lr_t * WEIGHT_DECAY * w (experiments/base.py) and leaves biases and norms alone
  from trainer.optimizer import adamw
  opt = adamw(lr=1e-3, warmup=4, schedule='cosine', num_steps=100, weight_decay=0.1)
  params = {'mlp': {'wi': {'kernel': jnp.full((3, 3), 2.0), 'bias': jnp.full((3,), 2.0)}}}
  state = opt.tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for step in range(6):
    updates, state = opt.tx.update(zero, state, params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    want = params['mlp']['wi']['kernel'] * (1 - float(opt.lr(step)) * 0.1)
    np.testing.assert_allclose(new['mlp']['wi']['kernel'], want, rtol=1e-6)
    np.testing.assert_array_equal(new['mlp']['wi']['bias'], params['mlp']['wi']['bias'])
    params = new
  # the ImageNet ViTs cite big_vision's wd 1e-4 per step at the peak LR, not multiplied by it
  from experiments.vit import ViT_B_ImageNet
  assert ViT_B_ImageNet.LR * ViT_B_ImageNet.WEIGHT_DECAY == pytest.approx(1e-4)


def test_interpolation_endpoints():
  x0, x1 = jnp.ones((2, 3)), jnp.full((2, 3), 5.0)
  np.testing.assert_allclose(diffusion.interpolate(x0, x1, jnp.zeros(2)), x0)
  np.testing.assert_allclose(diffusion.interpolate(x0, x1, jnp.ones(2)), 5 + 1e-5, rtol=1e-6)


def test_euler_integrates_linear_field_exactly():
  # dx/dt = a + b t  ->  x(1) = x(0) + a + b/2; Euler on N steps gives a + b (N-1)/(2N)
  x0 = jnp.arange(6.0).reshape(2, 3)
  out = diffusion.euler_sample(lambda x, t, k: jnp.full_like(x, 3.0), x0, num_steps=10)
  np.testing.assert_allclose(out, x0 + 3.0, atol=1e-5)
  n = 8
  out = diffusion.euler_sample(lambda x, t, k: 2.0 * t[:, None] * jnp.ones_like(x), x0, n)
  np.testing.assert_allclose(out, x0 + (n - 1) / n, atol=1e-5)


def test_heun_is_exact_on_linear_time_fields_and_second_order():
  x0 = jnp.arange(6.0).reshape(2, 3)
  # dx/dt = 2t: the trapezoid rule is exact for any number of steps (Euler is not, above)
  out = diffusion.heun_sample(lambda x, t, k: 2.0 * t[:, None] * jnp.ones_like(x), x0, 3)
  np.testing.assert_allclose(out, x0 + 1.0, atol=1e-5)
  # dx/dt = x: each step multiplies by 1 + h + h^2/2, closed form against e
  for n in (4, 8):
    out = diffusion.heun_sample(lambda x, t, k: x, x0, n)
    np.testing.assert_allclose(out, x0 * (1 + 1 / n + 0.5 / n**2) ** n, rtol=1e-5)
  err = [float(jnp.abs(diffusion.heun_sample(lambda x, t, k: x, x0, n) - x0 * np.e).max())
         for n in (4, 8)]
  assert 3.5 < err[0] / err[1] < 4.5      # halving the step quarters the error


class _RecordsShift:
  """A velocity model that records the grid shift of every call (None without one), also
  inside jit, and how many rows the call had."""

  def __init__(self):
    self.seen = []

  def apply(self, variables, x_t, t, y, **kw):
    if 'shift' not in kw:
      self.seen.append(None)
      return jnp.zeros_like(x_t)
    jax.debug.callback(lambda s: self.seen.append(np.asarray(s)), kw['shift'])
    return jnp.zeros_like(x_t)


def test_grid_shifts_reach_the_model_per_image_and_per_sampler_call():
  p, n = 4, 6
  batch = {'image': jnp.zeros((512, 8, 8, 1)), 'label': jnp.zeros((512,), jnp.int32)}
  plain = diffusion.FlowMatching(num_classes=10, denoise_timesteps=n)
  model = _RecordsShift()
  plain.loss(model, None, batch, jax.random.key(0))
  plain.sample(model, None, jnp.arange(3), jax.random.key(1), (8, 8, 1), cfg_scale=1.0)
  assert model.seen == [None] * 2                  # no shifts unless asked for

  task = diffusion.FlowMatching(num_classes=10, denoise_timesteps=n, shift_period=p,
                                cfg_interval=(0.3, 0.7), cfg_scale=2.0)
  model = _RecordsShift()
  task.loss(model, None, batch, jax.random.key(0))
  s = model.seen[0]
  assert s.shape == (512, 2) and s.dtype == np.int32
  pairs = set(map(tuple, s.tolist()))
  assert pairs == {(i, j) for i in range(p) for j in range(p)}   # every phase, image by image
  # the draws of t, noise and dropped labels are those of a run without shifts
  class Echo:
    def apply(self, variables, x_t, t, y, **kw):
      return x_t * t[:, None, None, None] + (y == 10)[:, None, None, None]
  m = jnp.linspace(-1, 1, 64).reshape(1, 8, 8, 1)
  real = {'image': jnp.broadcast_to(m, (512, 8, 8, 1)), 'label': batch['label']}
  np.testing.assert_array_equal(task.loss(Echo(), None, real, jax.random.key(3))[0],
                                plain.loss(Echo(), None, real, jax.random.key(3))[0])
  model.seen.clear()
  task.eval_step(model, None, batch, jax.random.key(4))
  eval_shift = model.seen[0]
  assert eval_shift.shape == (512, 2) and len(set(map(tuple, eval_shift.tolist()))) == p * p

  model.seen.clear()
  task.sample(model, None, jnp.arange(3), jax.random.key(1), (8, 8, 1))
  assert len(model.seen) == n                      # one shift array a sampler call
  guided = [k for k in range(n) if 0.3 <= k / n < 0.7]
  for k, s in enumerate(model.seen):
    assert s.shape == ((6, 2) if k in guided else (3, 2))
    assert (s >= 0).all() and (s < p).all()
    if k in guided:                                # the class and null halves share a grid
      np.testing.assert_array_equal(s[:3], s[3:])
  calls = np.stack([s[:3] for s in model.seen])     # [calls, images, 2]
  assert len({c.tobytes() for c in calls}) == n     # a new draw each call
  with pytest.raises(ValueError, match='shift_period -1'):
    diffusion.FlowMatching(num_classes=10, shift_period=-1)


class _ClassVelocity:
  """Velocity = label value (null class -> -1), constant in x and t."""

  def apply(self, variables, x, t, y):
    v = jnp.where(y == 10, -1.0, y.astype(jnp.float32))
    return jnp.broadcast_to(v[:, None, None, None], x.shape)


@pytest.mark.parametrize('cfg,sampler', [(1.0, 'euler'), (4.0, 'euler'), (4.0, 'heun')])
def test_sampler_applies_classifier_free_guidance(cfg, sampler):
  task = diffusion.FlowMatching(num_classes=10, denoise_timesteps=16, sampler=sampler)
  labels = jnp.array([2, 5])
  out = task.sample(_ClassVelocity(), None, labels, jax.random.key(0), (2, 2, 1), cfg_scale=cfg)
  x0 = jax.random.normal(jax.random.key(0), (2, 2, 2, 1))
  guided = -1.0 + cfg * (labels - -1.0)
  np.testing.assert_allclose(out, x0 + guided[:, None, None, None], atol=1e-4)


@pytest.mark.parametrize('sampler', ['euler', 'heun'])
def test_guidance_interval_guides_only_the_steps_inside_it(sampler):
  # constant velocities: the sample is x0 plus the step-weighted mean of the velocities used,
  # so the number of guided calls shows in the result (a reference loop in NumPy)
  n, cfg, (lo, hi) = 16, 4.0, (0.25, 0.7)
  task = diffusion.FlowMatching(num_classes=10, denoise_timesteps=n, sampler=sampler,
                                cfg_interval=(lo, hi))
  labels = np.array([2.0, 5.0])
  out = task.sample(_ClassVelocity(), None, jnp.array([2, 5]), jax.random.key(0), (2, 2, 1),
                    cfg_scale=cfg)
  v = lambda t: -1.0 + cfg * (labels + 1.0) if lo <= t < hi else labels
  dt, shift = 1 / n, np.zeros(2)
  for i in range(n):
    t = np.float32(i * dt)
    shift += dt * v(t) if sampler == 'euler' else 0.5 * dt * (v(t) + v(np.float32(t + dt)))
  x0 = jax.random.normal(jax.random.key(0), (2, 2, 2, 1))
  np.testing.assert_allclose(out, x0 + shift[:, None, None, None], atol=1e-4)
  # the interval changes the result: guiding every step gives another sample
  everywhere = x0 + (-1.0 + cfg * (labels + 1.0))[:, None, None, None]
  assert np.abs(np.asarray(out) - np.asarray(everywhere)).max() > 1
  with pytest.raises(ValueError, match=r'cfg_interval \(0.5, 0.5\).*0 <= lo < hi <= 1'):
    diffusion.FlowMatching(num_classes=10, cfg_interval=(0.5, 0.5))


def test_cross_entropy_and_label_smoothing_match_numpy():
  logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  labels = np.array([0, 3, 6, 2, 2])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -logp[np.arange(5), labels]
  np.testing.assert_allclose(common.cross_entropy(jnp.asarray(logits), labels), nll, rtol=1e-5)
  target = np.full((5, 7), 0.1 / 7)
  target[np.arange(5), labels] += 0.9
  np.testing.assert_allclose(common.cross_entropy(jnp.asarray(logits), labels, 0.1),
                             -(target * logp).sum(-1), rtol=1e-5)


class _FixedLogits:
  def __init__(self, logits):
    self.logits = logits

  def apply(self, variables, x):
    return self.logits


def test_classification_eval_ignores_padding():
  logits = jnp.array([[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]])
  batch = {'image': None, 'label': jnp.array([0, 0, 1]), 'mask': jnp.array([1.0, 1.0, 0.0])}
  task = Classification(num_classes=2)
  m = task.finalize(task.eval_step(_FixedLogits(logits), None, batch))
  assert m['accuracy'] == 0.5
  want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(3.0))])
  np.testing.assert_allclose(m['loss'], want, rtol=1e-5)


class _Linear:
  def __init__(self, w):
    self.w = w

  def apply(self, variables, x):
    return x.reshape(x.shape[0], -1) @ self.w


def test_mixup_matches_numpy():
  """big_vision's mixup: weight a = max(b, 1 - b), b ~ Beta(p, p); image i is mixed with image
  i - 1 and the loss is a CE(label i) + (1 - a) CE(label i - 1)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
  w = rng.normal(size=(12, 5)).astype(np.float32)
  y = np.array([0, 4, 2, 2])
  key = jax.random.key(0)
  task = Classification(num_classes=5, mixup=1.0)   # Beta(1, 1): a moderate weight is likely
  loss, _ = task.loss(_Linear(jnp.asarray(w)), None, {'image': jnp.asarray(x), 'label': y}, key)
  b = float(jax.random.beta(key, 1.0, 1.0))
  a = max(b, 1 - b)
  assert a < 0.9, a
  mixed = a * x + (1 - a) * np.roll(x, 1, axis=0)
  logits = mixed.reshape(4, -1).astype(np.float64) @ w
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -(a * logp[np.arange(4), y] + (1 - a) * logp[np.arange(4), np.roll(y, 1)]).mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  plain, _ = Classification(num_classes=5).loss(_Linear(jnp.asarray(w)), None,
                                                {'image': jnp.asarray(x), 'label': y}, key)
  assert abs(float(plain) - want) > 1e-3   # the mixing changed the loss


class _EchoLM:
  """Predicts token t+1 = token t + 1 with certainty, so the loss is known. Given targets it
  returns per-token (nll, correct), as models.gpt.GPT does."""

  def apply(self, variables, tokens, targets=None):
    logits = 20.0 * jax.nn.one_hot((tokens + 1) % 8, 8)
    if targets is None:
      return logits
    return common.cross_entropy(logits, targets), logits.argmax(-1) == targets


def test_language_loss_shifts_targets():
  tokens = jnp.array([[0, 1, 2, 3, 4], [5, 6, 7, 0, 2]])
  task = LanguageModeling()
  loss, metrics = task.loss(_EchoLM(), None, {'tokens': tokens}, None)
  # 7 of 8 targets follow the rule; the miss (0 -> 2) costs ~20
  assert float(metrics['accuracy']) == 7 / 8
  np.testing.assert_allclose(loss, 20.0 / 8, rtol=1e-3)
  sums = task.eval_step(_EchoLM(), None, {'tokens': tokens, 'mask': jnp.array([1.0, 0.0])})
  m = task.finalize(sums)
  assert m['accuracy'] == 1.0 and m['perplexity'] < 1.001


def test_weight_decay_mask():
  params = {'token_embed': {'embedding': 0}, 'block': {'norm': {'scale': 0, 'bias': 0},
            'mlp': {'wi': {'kernel': 0, 'bias': 0}}}, 'cls_token': 0}
  mask = common.weight_decay_mask(params)
  assert mask == {'token_embed': {'embedding': False}, 'cls_token': False,
                  'block': {'norm': {'scale': False, 'bias': False},
                            'mlp': {'wi': {'kernel': True, 'bias': False}}}}


def test_top_k_and_greedy_sampling():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
  assert int(sample_logits(None, logits, temperature=0)[0]) == 1
  draws = jax.vmap(lambda k: sample_logits(k, logits, top_k=2))(
      jax.random.split(jax.random.key(0), 400))
  assert set(np.unique(draws).tolist()) == {1, 3}


def test_greedy_generation_matches_repeated_full_forward():
  model = GPT(vocab_size=32, max_len=16, hidden=32, depth=2, heads=4)
  prompt = jnp.array([[3, 1, 4], [1, 5, 9]])
  params = jax.jit(lambda r: nn.unbox(model.init(r, prompt))['params'])(jax.random.key(0))
  out = jax.jit(lambda p: generate(model, p, prompt, 6, jax.random.key(1), temperature=0))(params)
  assert out.shape == (2, 9)
  seq = prompt
  full = jax.jit(lambda p, s: model.apply({'params': p}, s))
  for _ in range(6):
    seq = jnp.concatenate([seq, full(params, seq)[:, -1].argmax(-1)[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq)
