"""Flow matching (rectified flow) for class-conditional image generation, and its samplers.

x0 is Gaussian noise, x1 the data, t in [0, 1] goes from noise to data:
  x_t = (1 - (1 - sigma_min) t) x0 + t x1,      target velocity v = x1 - (1 - sigma_min) x0.
t is drawn continuously during training (`t_sampling`: 'uniform' on [0, 1), or 'logit_normal',
sigmoid of a standard normal, which favours the middle of the path as in SD3, Esser et al. 2024),
so the sampler (Euler, or Heun's second-order method) may take any number of steps
(denoise_timesteps by default); 'grid' draws t from {0, 1/N, ..., (N-1)/N}, N =
denoise_timesteps, the Euler sampler's own grid. Labels are
replaced by the null class with probability class_dropout_prob so the same network also learns
the unconditional velocity used by classifier-free guidance:
  v = v_null + cfg_scale (v_label - v_null).
With `cfg_interval=(lo, hi)` guidance is applied only to the sampler's steps whose t lies in
[lo, hi), and the other steps follow v_label alone (Kynkäänniemi et al. 2024, "Applying
guidance in a limited interval improves sample and distribution quality in diffusion models":
guidance near pure noise narrows each class's variety, and near the data it is not needed).
Those steps then cost one network call instead of two.

With `shift_period` p (a DiT's patch size, experiments' GRID_SHIFT) every network call, in
training, evaluation and sampling, gets its own random patch-grid shift in [0, p)^2 per image
(models/dit.py): the network learns every phase of its grid, and each sampler step cuts the
image at another, so a patch-shaped error of one step is not repeated along the same borders by
the next.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tasks.common import batch_mask

SIGMA_MIN = 1e-5
SHIFT_STREAM = 0x5a1f        # folded into a key for the grid shifts, leaving its other draws as
                             # they are without shifts


def interpolate(x0, x1, t, sigma_min: float = SIGMA_MIN):
  t = t.reshape((-1,) + (1,) * (x1.ndim - 1))
  return (1 - (1 - sigma_min) * t) * x0 + t * x1


def velocity_target(x0, x1, sigma_min: float = SIGMA_MIN):
  return x1 - (1 - sigma_min) * x0


def euler_sample(velocity_fn, x0, num_steps: int):
  """Integrate dx/dt = velocity_fn(x, t, k) from t=0 to 1 in `num_steps` equal Euler steps; k
  counts the calls from 0 (a stream index for draws of their own, such as grid shifts)."""
  dt = 1.0 / num_steps

  def body(i, x):
    t = jnp.full((x.shape[0],), i * dt, jnp.float32)
    return x + dt * velocity_fn(x, t, i).astype(x.dtype)

  return jax.lax.fori_loop(0, num_steps, body, x0)


def heun_sample(velocity_fn, x0, num_steps: int):
  """The same integral by Heun's method (the trapezoid rule with an Euler predictor; Karras et
  al. 2022 use it for diffusion): second-order accurate at two velocity calls per step, so it
  reaches Euler's accuracy in far fewer calls on smooth paths."""
  dt = 1.0 / num_steps

  def body(i, x):
    t = jnp.full((x.shape[0],), i * dt, jnp.float32)
    v = velocity_fn(x, t, 2 * i).astype(x.dtype)
    v_next = velocity_fn(x + dt * v, t + dt, 2 * i + 1).astype(x.dtype)
    return x + 0.5 * dt * (v + v_next)

  return jax.lax.fori_loop(0, num_steps, body, x0)


SAMPLERS = {'euler': euler_sample, 'heun': heun_sample}
T_SAMPLING = ('uniform', 'logit_normal', 'grid')


def draw_t(rng, b: int, how: str, grid: int):
  """b training times in [0, 1): see the module docstring for `how` (FlowMatching checks it)."""
  if how == 'uniform':
    return jax.random.uniform(rng, (b,), jnp.float32)
  if how == 'logit_normal':
    return jax.nn.sigmoid(jax.random.normal(rng, (b,), jnp.float32))
  return (jax.random.randint(rng, (b,), 0, grid) / grid).astype(jnp.float32)


class FlowMatching:
  """batch: {'image': [b, H, W, c] in [-1, 1] (or latents), 'label': int [b]}."""

  def __init__(self, num_classes: int, image_size: int = 0, channels: int = 0,
               denoise_timesteps: int = 128, class_dropout_prob: float = 0.1,
               cfg_scale: float = 1.5, sample_classes: int = 10, samples_per_class: int = 8,
               t_sampling: str = 'uniform', class_names: tuple[str, ...] = (),
               sampler: str = 'euler', cfg_interval: tuple[float, float] = (0.0, 1.0),
               shift_period: int = 0):
    if shift_period < 0:
      raise ValueError(f'shift_period {shift_period}: the patch size whose grid shifts, or 0')
    self.shift_period = shift_period
    lo, hi = cfg_interval
    if not 0 <= lo < hi <= 1:
      raise ValueError(f'cfg_interval {cfg_interval!r}: the guided times [lo, hi) need '
                       '0 <= lo < hi <= 1')
    self.cfg_interval = (float(lo), float(hi))
    if t_sampling not in T_SAMPLING:
      raise ValueError(f't_sampling {t_sampling!r}: use one of {T_SAMPLING}')
    if sampler not in SAMPLERS:
      raise ValueError(f'sampler {sampler!r}: use one of {tuple(SAMPLERS)}')
    self.sampler = sampler
    self.t_sampling = t_sampling
    self.class_names = tuple(class_names)
    self.num_classes = num_classes
    self.image_size, self.channels = image_size, channels
    self.denoise_timesteps = denoise_timesteps
    self.class_dropout_prob = class_dropout_prob
    self.cfg_scale = cfg_scale
    self.sample_classes, self.samples_per_class = sample_classes, samples_per_class

  def init_inputs(self, batch_size: int):
    return (jnp.zeros((batch_size, self.image_size, self.image_size, self.channels)),
            jnp.zeros((batch_size,)), jnp.zeros((batch_size,), jnp.int32))

  def samples(self, model, params, rng):
    """{'images': [classes * per_class, H, W, c]}, one row per class (Euler + CFG), with the
    rows' labels ('3 Dress' given class names, else the class index)."""
    labels = jnp.repeat(jnp.arange(self.sample_classes), self.samples_per_class)
    shape = (self.image_size, self.image_size, self.channels)
    names = [f'{k} {self.class_names[k]}' if k < len(self.class_names) else str(k)
             for k in range(self.sample_classes)]
    return {'images': self.sample(model, params, labels, rng, shape),
            'ncols': self.samples_per_class, 'row_labels': names}

  def _noised(self, batch, rng):
    x1, y = batch['image'], batch['label']
    rng_t, rng_x, rng_y = jax.random.split(rng, 3)
    b = x1.shape[0]
    t = draw_t(rng_t, b, self.t_sampling, self.denoise_timesteps)
    x0 = jax.random.normal(rng_x, x1.shape, x1.dtype)
    return x0, x1, t, y, rng_y

  def _shift(self, rng, b: int):
    """[b, 2] grid shifts in [0, shift_period) from `rng`'s own stream; None without shifts."""
    if not self.shift_period:
      return None
    return jax.random.randint(jax.random.fold_in(rng, SHIFT_STREAM), (b, 2), 0,
                              self.shift_period)

  def _apply(self, model, params, x, t, y, shift):
    extra = {} if shift is None else {'shift': shift}
    return model.apply({'params': params}, x, t, y, **extra)

  def _per_example_loss(self, model, params, x0, x1, t, y, shift):
    v = self._apply(model, params, interpolate(x0, x1, t), t, y, shift)
    return jnp.square(v - velocity_target(x0, x1)).mean(axis=tuple(range(1, x1.ndim)))

  def loss(self, model, params, batch, rng):
    x0, x1, t, y, rng_y = self._noised(batch, rng)
    drop = jax.random.bernoulli(rng_y, self.class_dropout_prob, y.shape)
    y = jnp.where(drop, self.num_classes, y)
    shift = self._shift(rng, y.shape[0])
    loss = self._per_example_loss(model, params, x0, x1, t, y, shift).mean()
    return loss, {}

  def eval_step(self, model, params, batch, rng=None):
    """Conditional flow-matching loss with noise and t drawn from `rng` (a fixed key by default).
    The evaluator passes a key per eval batch (its index folded into a fixed key), so the eval
    loss of every checkpoint sees the same draws and the batches different ones."""
    rng = jax.random.key(0) if rng is None else rng
    x0, x1, t, y, _ = self._noised(batch, rng)
    mask = batch_mask(batch, x1.shape[0])
    shift = self._shift(rng, y.shape[0])
    per_example = self._per_example_loss(model, params, x0, x1, t, y, shift)
    return {'loss_sum': (per_example * mask).sum(), 'count': mask.sum()}

  def finalize(self, sums):
    return {'loss': float(sums['loss_sum']) / max(float(sums['count']), 1.0)}

  # jitted once per (task, model, shape, guidance): later grids of a run reuse the compilation
  @functools.partial(jax.jit, static_argnames=('self', 'model', 'shape', 'cfg_scale',
                                               'num_steps'))
  def sample(self, model, params, labels, rng, shape, cfg_scale: float | None = None,
             num_steps: int | None = None):
    """Images [b, *shape] for integer `labels` [b]; cfg_scale 1 means no guidance."""
    cfg = self.cfg_scale if cfg_scale is None else cfg_scale
    steps = num_steps or self.denoise_timesteps
    x0 = jax.random.normal(rng, (labels.shape[0],) + tuple(shape), jnp.float32)
    null = jnp.full_like(labels, self.num_classes)

    def plain(x, t, shift):
      return self._apply(model, params, x, t, labels, shift)

    def guided(x, t, shift):
      # one forward over [cond; uncond] halves the number of calls; both halves share the grid
      both = None if shift is None else jnp.concatenate([shift, shift])
      v = self._apply(model, params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                      jnp.concatenate([labels, null]), both)
      v_cond, v_null = jnp.split(v, 2)
      return v_null + cfg * (v_cond - v_null)

    lo, hi = self.cfg_interval
    if cfg == 1.0:
      velocity = plain
    elif (lo, hi) == (0.0, 1.0):
      velocity = guided
    else:   # every row of a step shares its t, so one branch serves the whole batch
      velocity = lambda x, t, shift: jax.lax.cond((t[0] >= lo) & (t[0] < hi), guided, plain,
                                                  x, t, shift)

    def call(x, t, k):      # each call its own grid shifts
      return velocity(x, t, self._shift(jax.random.fold_in(rng, k), x.shape[0]))

    return SAMPLERS[self.sampler](call, x0, steps)
