"""Training a VAE (models/vae.py): reconstruction + KL, the loss of Stable Diffusion's autoencoder
without its perceptual and adversarial terms.

Per example, with z ~ q(z|x) = N(mean, exp(logvar)) drawn by the reparameterisation trick:
  loss = sum over pixels |x - decode(z)| + kl_weight * KL(q(z|x) || N(0, I))
Summing over pixels (rather than averaging) keeps kl_weight on the scale LDM used (1e-6 there);
the loss is reported per pixel (`l1`) next to the `mse` and `psnr` of the posterior-mean
reconstruction, which is what a latent DiT's decoder output is judged by.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models import vae as vae_lib
from tasks.common import batch_mask


class Autoencoding:
  """batch: {'image': [b, H, W, c] in [-1, 1], optional 'mask'}; the model is an AutoencoderKL."""

  def __init__(self, image_size: int, channels: int, kl_weight: float = 1e-6):
    self.image_size, self.channels = image_size, channels
    self.kl_weight = kl_weight

  def init_inputs(self, batch_size: int):
    return (jnp.zeros((batch_size, self.image_size, self.image_size, self.channels)),)

  def _terms(self, model, params, x, rng):
    mean, logvar = model.apply({'params': params}, x, method='encode')
    z = mean if rng is None else vae_lib.sample_posterior(mean, logvar, rng)
    recon = model.apply({'params': params}, z, method='decode').astype(jnp.float32)
    dims = tuple(range(1, x.ndim))
    return (jnp.abs(x - recon).sum(dims), jnp.square(x - recon).mean(dims),
            vae_lib.kl_to_standard_normal(mean, logvar))

  def loss(self, model, params, batch, rng):
    x = batch['image']
    l1, mse, kl = self._terms(model, params, x, rng)
    pixels = x[0].size
    loss = (l1 + self.kl_weight * kl).mean() / pixels   # per pixel, so LR needs no rescaling
    return loss, {'l1': l1.mean() / pixels, 'mse': mse.mean(), 'kl': kl.mean()}

  def eval_step(self, model, params, batch, rng=None):   # deterministic: rng unused
    """Sums over real rows of the posterior-mean reconstruction's errors and of the KL."""
    x = batch['image']
    mask = batch_mask(batch, x.shape[0])
    l1, mse, kl = self._terms(model, params, x, None)
    # PSNR for images in [-1, 1] (peak-to-peak 2), from each image's own MSE
    psnr = 10 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))
    return {'l1_sum': (l1 / x[0].size * mask).sum(), 'mse_sum': (mse * mask).sum(),
            'psnr_sum': (psnr * mask).sum(), 'kl_sum': (kl * mask).sum(), 'count': mask.sum()}

  def finalize(self, sums):
    n = max(float(sums['count']), 1.0)
    return {k[:-4]: float(v) / n for k, v in sums.items() if k.endswith('_sum')}
