"""Measure the input pipelines alone (no model): examples/s of each dataset's training batches.

    python tools/input_bench.py --data_dir=D [--only imagenet_vit ...] [--threads 1 2]
        [--workers 0] [--batch 64] [--batches 8]
    python tools/input_bench.py --standins [...]   # prepare stand-ins in a temp dir, then measure

Each row builds the experiment's own training source (the same class, knobs and preprocessing
as `launch.py` would) and times `iterate()` over `--batches` batches after one warm-up batch,
for each thread / worker count asked. The machine's float32 matmul rate (a jitted 2048^3 matmul)
is printed with the table, so rates from different machines can be compared.

The stand-ins (tools/standins.py) are JPEGs of ImageNet's typical size (about 500x375, 50-150 KB),
so the decode cost per image is close to the real dataset's; OpenWebText's stand-in is short
documents, so its rate is of the reader, not of a real corpus.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# name -> the experiment whose training source is measured
PIPELINES = {
    'imagenet_dit256': 'DiT_B_ImageNet256',
    'imagenet_vit224': 'ViT_B_ImageNet',
    'imagenet_vit224_augment': 'ViT_B_ImageNet_Augment',
    'celebahq256': 'DiT_B_CelebAHQ256',
    'lsun_church': 'DiT_B_LSUNChurch256',
    'openwebtext_1024': 'GPT_B_OWT',
}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """float32 GFLOP/s of a jitted n^3 matmul on the default device (best of `repeats`)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def build_source(exp_name: str, data_dir: str, batch: int, threads: int, workers: int):
  import fiddle as fdl
  from experiments import base
  overrides = {'GLOBAL_BATCH': batch, 'DATA_DIR': data_dir, 'DATA_THREADS': threads,
               'DATA_WORKERS': workers}
  exp_cls = base.get(exp_name)
  overrides = [f'{k}={v!r}' for k, v in overrides.items() if k in exp_cls.knobs()]
  _, cfg = base.build_config(exp_name, overrides)
  source = fdl.build(cfg.train_data)
  source.threads = threads   # also where the experiment has no DATA_THREADS knob (text)
  return source


def measure(source, batches: int) -> float:
  """examples/s of `batches` batches from iterate(), after one warm-up batch."""
  with contextlib.closing(source.iterate(0, batches + 1)) as it:
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  return batches * source.local_batch / seconds


def prepare_standins(root: str) -> str:
  from input.builders import prepare
  from tools import standins
  data_dir = os.path.join(root, 'data')
  raw = os.path.join(root, 'raw')
  standins.ilsvrc_tars(os.path.join(raw, 'ilsvrc'), num_classes=4, per_class=32, num_val=16)
  standins.celebahq_folder(os.path.join(raw, 'celebahq'), per_class=32)
  standins.lsun_folder(os.path.join(raw, 'lsun'), n=64)
  standins.owt_files(os.path.join(raw, 'owt'), num_docs=2000)
  for name, src in [('imagenet2012', 'ilsvrc'), ('celebahq256', 'celebahq'),
                    ('lsun_church', 'lsun'), ('openwebtext', 'owt')]:
    prepare(name, data_dir, os.path.join(raw, src),
            **({'holdout_every': 4} if name == 'openwebtext' else {}))
  return data_dir


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data_dir', help='where the prepared datasets are (TFDS data_dir)')
  p.add_argument('--standins', action='store_true',
                 help='prepare stand-ins of every dataset in a temp dir and measure those')
  p.add_argument('--only', nargs='*', choices=sorted(PIPELINES), help='pipelines to measure')
  p.add_argument('--threads', nargs='*', type=int, default=[1], help='thread counts to try')
  p.add_argument('--workers', nargs='*', type=int, default=[0], help='worker process counts')
  p.add_argument('--batch', type=int, default=64, help='batch size (default 64)')
  p.add_argument('--batches', type=int, default=8, help='timed batches (default 8)')
  args = p.parse_args(argv)
  if bool(args.data_dir) == args.standins:
    p.error('give --data_dir=D or --standins')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = prepare_standins(tmp) if args.standins else args.data_dir
    gflops = matmul_gflops()
    print(f'\nmachine: {os.cpu_count()} CPUs, float32 matmul {gflops:.0f} GFLOP/s (2048^3, jit)')
    print('\n| pipeline | experiment | threads | workers | batch | examples/s |')
    print('| --- | --- | ---: | ---: | ---: | ---: |')
    for name in args.only or PIPELINES:
      exp_name = PIPELINES[name]
      for workers in args.workers:
        for threads in args.threads:
          try:
            source = build_source(exp_name, data_dir, args.batch, threads, workers)
            rate = f'{measure(source, args.batches):,.0f}'
          except FileNotFoundError as e:
            rate = f'not prepared ({str(e).splitlines()[0][:60]}...)'
          print(f'| {name} | {exp_name} | {threads} | {workers} | {args.batch} | {rate} |',
                flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
