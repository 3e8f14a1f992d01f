"""Convert pytorch-fid's FID Inception weights (.pth) into the .npz that models/inception.py reads.

    python tools/convert_inception.py --pth=PATH/pt_inception-2015-12-05-6726825d.pth \
        --out=weights/fid_inception_v3.npz

The .pth is pytorch-fid's GitHub release asset 'fid_weights'
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
Without --pth the tool asks pytorch-fid for it (`fid_inception_v3()`, which downloads it into
torch's hub cache), which works only online. torch is needed here and nowhere else: the .npz
loads with NumPy alone. The written file is read back with `FIDInception` before this exits.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--pth', default=None, help='pt_inception-2015-12-05-6726825d.pth (default: '
                 "download it with pytorch-fid, online only)")
  p.add_argument('--out', default='weights/fid_inception_v3.npz', help='the .npz to write')
  return p.parse_args(argv)


def torch_state_dict(pth: str | None) -> dict:
  """name -> float32 NumPy array, from the .pth or, without one, from pytorch-fid's download."""
  import torch
  if pth:
    state = torch.load(pth, map_location='cpu', weights_only=True)
  else:
    from pytorch_fid import inception as pytorch_fid_inception
    try:
      state = pytorch_fid_inception.fid_inception_v3().state_dict()
    except Exception as e:  # offline: urllib's URLError, or a partial download
      raise SystemExit(f'convert_inception.py: could not download the FID weights '
                       f'({type(e).__name__}); download {pytorch_fid_inception.FID_WEIGHTS_URL} '
                       f'elsewhere and pass --pth=PATH') from None
  if not isinstance(state, dict):
    raise SystemExit(f'convert_inception.py: {pth} holds a {type(state).__name__}, not a '
                     'state dict')
  return {k: v.detach().cpu().float().numpy() for k, v in state.items()
          if not k.endswith('num_batches_tracked')}


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax
  import numpy as np

  from models import inception

  if args.pth and not os.path.isfile(args.pth):
    raise SystemExit(f'convert_inception.py: no file {args.pth}')
  params = inception.params_from_torch(torch_state_dict(args.pth))
  inception.save(params, args.out)

  reloaded = inception.FIDInception(args.out).params
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  if shapes(reloaded) != shapes(params):
    raise SystemExit(f'convert_inception.py: {args.out} reads back with other shapes')
  size = os.path.getsize(args.out) / 2**20
  print(f'wrote {args.out}: {inception.num_params(reloaded):,} parameters '
        f'(convolutions and batch-norm statistics), {size:.1f} MiB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
