"""Feature statistics (mu, sigma: the pytorch-fid / ADM .npz) of real images or of samples, and
the Fréchet distance between two such files.

    # reference statistics of a dataset split, on the FID Inception's pool3 features
    python tools/fid_stats.py --exp=DiT_B_ImageNet256 --set DATA_DIR=D --split=train \
        --num=50000 --out=ref/imagenet256_train.npz
    # statistics of samples (launch.py --mode=sample writes the .npz), and their FID
    python tools/fid_stats.py --images=samples.npz --out=samples_stats.npz --ref=ref.npz
    # on the features of a classifier trained here (DiT_T_FashionMNIST's judge), with its
    # accuracy against the labels
    python tools/fid_stats.py --exp=DiT_T_FashionMNIST --split=test --judge --out=test.npz

Images come from `--images` (an .npz with uint8 `images` [N, H, W, C], or ADM's `arr_0`, and
optional `labels`) or from an experiment's own image source (`--exp`, `--split`: in order,
center crop, no augmentation). Features come from the Inception at `--inception` (default the
experiment's INCEPTION_PATH), or with `--judge` from the experiment's judging classifier
(JUDGE_EXP, JUDGE_DIR). Batches are spread over every local device. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--images', help='.npz of uint8 images [N, H, W, C] (images or arr_0)')
  p.add_argument('--exp', help='read this experiment\'s images (unless --images), and take its '
                 'INCEPTION_PATH or judging classifier')
  p.add_argument('--set', action='append', default=[], help='KNOB=VALUE, as launch.py --set')
  p.add_argument('--split', default=None, help='with --exp: the split (default: its eval split)')
  p.add_argument('--num', type=int, default=0, help='use the first N images (0: all)')
  p.add_argument('--inception', default=None,
                 help='converted Inception weights (tools/convert_inception.py); default: the '
                 'experiment\'s INCEPTION_PATH, else weights/fid_inception_v3.npz')
  p.add_argument('--judge', action='store_true',
                 help='the experiment\'s judging classifier (JUDGE_EXP in JUDGE_DIR) instead of '
                 'Inception')
  p.add_argument('--batch', type=int, default=200, help='images per call (all devices)')
  p.add_argument('--out', help='write mu and sigma here (.npz)')
  p.add_argument('--ref', help='statistics .npz to measure the Fréchet distance to')
  args = p.parse_args(argv)
  if not (args.images or args.exp):
    p.error('give --images (an .npz of images) or --exp (its data), or both (the images, '
            'judged with the experiment\'s settings)')
  if args.images and args.split:
    p.error('--split reads the experiment\'s data; with --images there is nothing to split')
  if args.judge and not args.exp:
    p.error('--judge needs --exp (the experiment names its classifier)')
  if not (args.out or args.ref):
    p.error('give --out, --ref or both')
  return args


def batches_of_images(path: str, batch: int, num: int):
  """(images uint8 [<= batch, H, W, C], labels or None) from an .npz."""
  import numpy as np
  with np.load(path) as f:
    key = 'images' if 'images' in f.files else 'arr_0' if 'arr_0' in f.files else None
    if key is None:
      raise SystemExit(f'fid_stats.py: {path} has arrays {sorted(f.files)}; expected images '
                       '[N, H, W, C] uint8 under "images" (or ADM\'s "arr_0")')
    images = f[key]
    labels = f['labels'] if 'labels' in f.files else None
  if images.ndim != 4 or images.dtype != np.uint8:
    raise SystemExit(f'fid_stats.py: {path}:{key} is {images.dtype} {images.shape}; expected '
                     'uint8 [N, H, W, C]')
  n = min(num, len(images)) if num else len(images)
  for i in range(0, n, batch):
    j = min(i + batch, n)
    yield images[i:j], (labels[i:j] if labels is not None else None)


def batches_of_source(cfg, split: str, batch: int, num: int):
  """The experiment's images of `split`, in order, as uint8 with their labels."""
  import contextlib

  import numpy as np

  from tools.encode_latents import split_source
  from trainer.sampling import to_uint8
  source = split_source(cfg, split, batch)
  n = min(num, source.num_examples) if num else source.num_examples
  with contextlib.closing(source.iterate(0, -(-n // batch))) as it:
    for i, b in enumerate(it):
      if 'image' not in b:
        raise SystemExit(f'fid_stats.py: {type(source).__name__} gives no images')
      keep = (b['mask'] > 0) & (i * batch + np.arange(batch) < n)
      pixels = b['image'] if b['image'].dtype == np.uint8 else to_uint8(b['image'])
      yield pixels[keep], b['label'][keep]


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from tasks import fid
  from trainer.state import place_frozen

  exp = cfg = None
  if args.exp:
    from experiments import base
    exp, cfg = base.build_config(args.exp, args.set)
  if args.judge:
    from trainer.restore import TrainedClassifier
    if not getattr(exp, 'JUDGE_EXP', None):
      raise SystemExit(f'fid_stats.py: {args.exp} has no JUDGE_EXP (its judging classifier)')
    net = TrainedClassifier(exp.JUDGE_EXP, exp.JUDGE_DIR)
  else:
    from models import inception
    path = args.inception or getattr(exp, 'INCEPTION_PATH', None) or inception.DEFAULT_PATH
    net = inception.FIDInception(path)

  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ('batch',))
  rows = NamedSharding(mesh, P('batch'))
  batch = -(-args.batch // len(devices)) * len(devices)
  params, _ = place_frozen(net, mesh)

  @jax.jit
  def features(params, pixels):
    out = net.features(params, pixels)
    return out if isinstance(out, dict) else {'features': out}

  if args.images:
    batches = batches_of_images(args.images, batch, args.num)
  else:
    split = args.split or getattr(exp, 'EVAL_SPLIT', None) or cfg.eval_data.split
    batches = batches_of_source(cfg, split, batch, args.num)
  feats, correct, labelled = [], 0, 0
  for pixels, labels in batches:
    n = len(pixels)
    padded = np.concatenate([pixels, np.repeat(pixels[-1:], batch - n, 0)])
    out = jax.device_get(features(params, jax.device_put(padded.astype(np.float32), rows)))
    feats.append(out['features'][:n])
    if 'logits' in out and labels is not None:
      correct += int((out['logits'][:n].argmax(-1) == labels).sum())
      labelled += n
  feats = np.concatenate(feats)
  mu, sigma = fid.statistics(feats)
  record = {'num': len(feats), 'dims': int(feats.shape[1])}
  if labelled:
    record['accuracy'] = correct / labelled
  if args.out:
    fid.save_stats(args.out, mu, sigma)
    record['out'] = args.out
  if args.ref:
    record['frechet_distance'] = fid.frechet_distance(mu, sigma, *fid.load_stats(args.ref))
    record['ref'] = args.ref
  print(json.dumps(record))
  return 0


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  sys.exit(main())
