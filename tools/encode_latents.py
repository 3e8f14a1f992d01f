"""Encode a latent DiT's images once, so that training reads latents instead of running the VAE
encoder in every step (the speed option; docs/PERFORMANCE.md has the ratio).

    python tools/encode_latents.py --exp=DiT_B_ImageNet256 --set DATA_DIR=D --set VAE_PATH=V \
        --out=L                                     # then train with --set LATENTS_DIR=L
    python tools/encode_latents.py --exp=DiT_T_FashionMNIST_Latent --out=workdirs/fmnist_latents

Reads the experiment's own image source (its DATA_DIR / IMAGE_FOLDER / Fashion-MNIST, center
crop, no augmentation), in order, for its train and eval splits; encodes each image and its
mirror image with the experiment's VAE, batched over every local device; and writes the
posterior moments with the labels as an ArrayRecord dataset (layout in input/latents.py). The
DiT then draws its own posterior sample in each step, as with in-step encoding.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--exp', required=True, help='a DiT experiment with USE_VAE (or --set it)')
  p.add_argument('--set', action='append', default=[], help='KNOB=VALUE, as launch.py --set')
  p.add_argument('--out', required=True, help='directory of the latent dataset')
  p.add_argument('--splits', default=None,
                 help='comma-separated splits (default: the experiment\'s train and eval split)')
  p.add_argument('--batch', type=int, default=64, help='images per encoder call (all devices)')
  p.add_argument('--shards', type=int, default=0,
                 help='files per split (default: one per 100k examples, at least 1)')
  p.add_argument('--limit', type=int, default=0, help='encode only the first N examples of '
                 'each split (a quick look; 0: all)')
  return p.parse_args(argv)


def split_source(cfg, split: str, batch: int):
  """The experiment's eval-mode image source (in order, center crop, padded last batch) for
  `split`."""
  import inspect

  import fiddle as fdl
  source = copy.deepcopy(cfg.eval_data)
  if 'split' not in inspect.signature(source.__fn_or_cls__).parameters:
    raise SystemExit(f'encode_latents.py: {source.__fn_or_cls__.__name__} has no split '
                     'argument; it cannot be encoded by split')
  source.split = split
  source.global_batch = batch
  return fdl.build(source)


def main(argv=None) -> int:
  args = parse_args(argv)
  import fiddle as fdl
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from tqdm import tqdm

  from experiments import base
  from input import latents
  from tasks.common import pixels_to_float

  exp, cfg = base.build_config(args.exp, args.set)
  if cfg.codec is None:
    raise SystemExit(f'encode_latents.py: {args.exp} has no VAE; add --set USE_VAE=True')
  codec = fdl.build(cfg.codec)
  size, channels = exp.input_shape()
  splits = (args.splits.split(',') if args.splits else
            [getattr(exp, 'TRAIN_SPLIT', 'train'), getattr(exp, 'EVAL_SPLIT', 'test')])

  devices = jax.local_devices()
  if args.batch % len(devices):
    raise SystemExit(f'encode_latents.py: --batch={args.batch} is not divisible by the '
                     f'{len(devices)} local devices')
  mesh = Mesh(np.array(devices), ('data',))
  rows = NamedSharding(mesh, P('data'))
  params = jax.device_put(codec.params, NamedSharding(mesh, P()))

  @jax.jit
  def encode(params, images):
    images = pixels_to_float(images)                        # uint8 -> [-1, 1], on the device
    both = jnp.concatenate([images, images[:, :, ::-1]])   # the image and its mirror image
    mean, logvar = codec.encode(params, both)
    moments = jnp.concatenate([mean, logvar], axis=-1)
    return jnp.stack(jnp.split(moments, 2), axis=1)         # [b, 2, h, w, 2c]

  info = {'experiment': args.exp, 'vae_path': str(codec.path),
          'vae': codec.model.config.to_dict(), 'image_size': int(exp.IMAGE_SIZE)}
  for split in splits:
    source = split_source(cfg, split, args.batch)
    n = min(source.num_examples, args.limit) if args.limit else source.num_examples
    shards = args.shards or max(1, round(n / 100_000))
    writer = latents.LatentWriter(args.out, split, size, channels, shards, info)
    t0 = time.perf_counter()
    for step in tqdm(range(-(-n // args.batch)), desc=f'{split} ({n} images)'):
      batch = source.batch(step)
      images = jax.device_put(batch['image'], rows)
      moments = np.asarray(encode(params, images))
      keep = min(args.batch, n - step * args.batch)
      for label, m in zip(batch['label'][:keep], moments[:keep]):
        writer.write(int(label), m)
    writer.close()
    print(f'{split}: {writer.count} images -> {args.out} in {time.perf_counter() - t0:.1f} s '
          f'({shards} file{"s" * (shards > 1)})')
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  sys.exit(main())
