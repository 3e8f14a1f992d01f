"""Plot scalar curves from a run's TensorBoard events into a PNG (no plotting library needed).

    python tools/plot_curves.py --logdir=workdirs/dit_t_fmnist/tensorboard \
        --tags learning/loss eval/loss --out=docs/dit_t_fmnist_loss.png [--log_y]

Each tag is one coloured line over the training step, on shared axes, with the tag names in a
legend; `--log_y` uses a logarithmic y axis (losses that fall by orders of magnitude). The events
are read with trainer.summaries.read_scalars, so any workdir this project wrote works, local or a
bucket URL.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75)]
WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50     # margins around the plotting area


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
  """About n round values spanning [lo, hi]."""
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / n
  step = 10 ** math.floor(math.log10(raw))
  step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
  return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
  """Round values (1, 2, 5 x 10^k, or every digit over a short range) between 10^lo and
  10^hi, returned as their log10 like the axis."""
  for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
    vals = [m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mults]
    inside = [math.log10(v) for v in vals if lo <= math.log10(v) <= hi]
    if len(inside) >= 4:
      return inside
  return _ticks(lo, hi)


def _fmt(v: float) -> str:
  return f'{v:.3g}'


def plot(curves: dict[str, list[tuple[int, float]]], log_y: bool = False) -> np.ndarray:
  """curves: tag -> [(step, value)] -> an RGB uint8 image [HEIGHT, WIDTH, 3]."""
  curves = {tag: [(s, v) for s, v in pts if math.isfinite(v) and (v > 0 or not log_y)]
            for tag, pts in curves.items()}
  curves = {tag: pts for tag, pts in curves.items() if pts}
  if not curves:
    raise ValueError('no finite values to plot' + (' (log_y needs positive values)'
                                                   if log_y else ''))
  fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
  steps = [s for pts in curves.values() for s, _ in pts]
  ys = [fy(v) for pts in curves.values() for _, v in pts]
  x0, x1 = min(steps), max(max(steps), min(steps) + 1)
  y0, y1 = min(ys), max(ys)
  if y1 - y0 < 1e-12:
    y0, y1 = y0 - 0.5, y1 + 0.5
  pad = 0.05 * (y1 - y0)
  y0, y1 = y0 - pad, y1 + pad
  w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
  px = lambda s: LEFT + (s - x0) / (x1 - x0) * w
  py = lambda y: TOP + (1 - (y - y0) / (y1 - y0)) * h

  image = Image.new('RGB', (WIDTH, HEIGHT), 'white')
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  draw.rectangle([LEFT, TOP, LEFT + w, TOP + h], outline=(0, 0, 0))
  for s in _ticks(x0, x1):
    draw.line([px(s), TOP + h, px(s), TOP + h + 4], fill=(0, 0, 0))
    draw.text((px(s), TOP + h + 6), _fmt(s), fill=(0, 0, 0), font=font, anchor='ma')
  for y in (_log_ticks if log_y else _ticks)(y0, y1):
    draw.line([LEFT - 4, py(y), LEFT, py(y)], fill=(0, 0, 0))
    draw.line([LEFT + 1, py(y), LEFT + w - 1, py(y)], fill=(230, 230, 230))
    draw.text((LEFT - 6, py(y)), _fmt(10 ** y if log_y else y), fill=(0, 0, 0), font=font,
              anchor='rm')
  draw.text((LEFT + w / 2, HEIGHT - 14), 'step', fill=(0, 0, 0), font=font, anchor='mm')
  for i, (tag, pts) in enumerate(curves.items()):
    colour = COLOURS[i % len(COLOURS)]
    xy = [(px(s), py(fy(v))) for s, v in sorted(pts)]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for x, y in xy if len(xy) <= 30 else []:   # few points (an eval curve): mark each
      draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
    ly = TOP + 8 + 14 * i
    draw.line([LEFT + w - 150, ly, LEFT + w - 130, ly], fill=colour, width=2)
    draw.text((LEFT + w - 125, ly), tag, fill=(0, 0, 0), font=font, anchor='lm')
  return np.asarray(image)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--logdir', required=True, help="a run's tensorboard directory")
  p.add_argument('--tags', nargs='+', required=True, help='scalar tags, e.g. learning/loss')
  p.add_argument('--out', required=True, help='the PNG to write')
  p.add_argument('--log_y', action='store_true', help='logarithmic y axis')
  args = p.parse_args(argv)
  from trainer.summaries import read_scalars, save_png
  scalars = read_scalars(args.logdir)
  missing = [t for t in args.tags if t not in scalars]
  if missing:
    print(f'plot_curves: no scalar {missing[0]!r} under {args.logdir}; it has: '
          f'{", ".join(sorted(scalars)) or "none"}', file=sys.stderr)
    return 2
  save_png(args.out, plot({t: scalars[t] for t in args.tags}, args.log_y))
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
