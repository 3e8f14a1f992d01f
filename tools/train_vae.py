"""Train a small VAE here and write it in diffusers' AutoencoderKL format.

    python tools/train_vae.py                      # VAE_T_FashionMNIST, ~4 minutes on 2 CPU cores
    python tools/train_vae.py --exp=MyVAE --workdir=W --out=D --set NUM_STEPS=3000

Trains the experiment through the usual loop (so rerunning resumes, and TensorBoard shows it in
--workdir), then sets the config's scaling_factor to 1 / (std of posterior samples of training
images), as Stable Diffusion's 0.18215 was chosen, saves config.json +
diffusion_pytorch_model.safetensors in --out, reads them back with models.vae.from_pretrained
and reports the reconstruction error of the saved model on the whole eval split
(--out/metrics.json). DiT experiments read it with USE_VAE=True VAE_PATH=--out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_EXP = 'VAE_T_FashionMNIST'
DEFAULT_WORKDIR = 'workdirs/vae_t_fmnist'


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--exp', default=DEFAULT_EXP, help='a VAE experiment (experiments/vae.py)')
  p.add_argument('--workdir', default=None, help=f'training run directory (default '
                 f'{DEFAULT_WORKDIR} for {DEFAULT_EXP}, else workdirs/<exp>)')
  p.add_argument('--out', default=None, help='where the diffusers-format VAE goes (default '
                 '<workdir>/diffusers)')
  p.add_argument('--set', action='append', default=[], help='KNOB=VALUE, as launch.py --set')
  p.add_argument('--scale_batches', type=int, default=16,
                 help='training batches whose latents set scaling_factor')
  p.add_argument('--eval_batches', type=int, default=0,
                 help='eval batches the saved model is measured on (0: the whole split)')
  return p.parse_args(argv)


def latent_std(model, params, source, batches: int) -> float:
  """Std of posterior samples z over `batches` training batches (all dims pooled)."""
  import jax
  import numpy as np
  from models import vae
  from tasks.common import pixels_to_float

  @jax.jit
  def sample(params, images, key):
    mean, logvar = model.apply({'params': params}, pixels_to_float(images), method='encode')
    return vae.sample_posterior(mean, logvar, key)

  zs = [np.asarray(sample(params, source.batch(i)['image'], jax.random.key(i)))
        for i in range(batches)]
  return float(np.concatenate(zs).std())


def main(argv=None) -> int:
  args = parse_args(argv)
  workdir = args.workdir or (DEFAULT_WORKDIR if args.exp == DEFAULT_EXP else
                             os.path.join('workdirs', args.exp))
  out = args.out or os.path.join(workdir, 'diffusers')

  import fiddle as fdl
  import jax
  from absl import logging

  import launch
  from experiments import base
  from experiments.vae import VAE
  from models import vae
  from tasks.common import prepare_images
  from trainer import loop
  from trainer.restore import latest_params
  logging.set_verbosity(logging.INFO)

  exp, cfg = base.build_config(args.exp, args.set)
  if not isinstance(exp, VAE):
    raise SystemExit(f'train_vae.py: --exp={args.exp} is not a VAE experiment '
                     '(experiments/vae.py)')
  run = fdl.build(cfg)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  loop.train(run, workdir, launch.config_text(cfg))
  train_s = time.perf_counter() - t0

  params, step, _ = latest_params(run, workdir)
  params = jax.device_get(params)
  std = latent_std(run.model, params, run.train_data, args.scale_batches)
  config = dataclasses.replace(run.model.config, scaling_factor=round(1.0 / std, 5))
  vae.save_pretrained(out, config, params)

  # what a user of the file gets: read it back and measure it on the whole eval split
  model, loaded = vae.from_pretrained(out)
  eval_step = jax.jit(lambda p, b: run.task.eval_step(model, p, prepare_images(b)))
  sums = None
  n = run.eval_data.num_eval_batches()
  for i in range(min(n, args.eval_batches) if args.eval_batches else n):
    o = jax.device_get(eval_step(loaded, run.eval_data.batch(i)))
    sums = o if sums is None else jax.tree.map(lambda a, b: a + b, sums, o)
  metrics = run.task.finalize(sums)
  report = {'experiment': args.exp, 'step': step, 'train_seconds': round(train_s, 1),
            'latent_std': std, 'scaling_factor': config.scaling_factor,
            'eval_split_examples': int(sums['count']), **metrics}
  with open(os.path.join(out, 'metrics.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))
  print(f'wrote {out} (diffusers AutoencoderKL); use it with --set USE_VAE=True '
        f'--set VAE_PATH={out}')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from trainer import allocator
  print(allocator.reexec(), file=sys.stderr)   # TCMalloc, as launch.py trains with
  sys.exit(main())
