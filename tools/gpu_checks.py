"""Correctness checks that need an accelerator; run by tools/gpu_bench.sh before the timings.

1. The fused attention paths ('xla', 'cudnn') against the einsum reference, causal and not,
   float32 and bfloat16.
2. ATTENTION_IMPL='auto' at the shapes the at-scale defaults give it (ViT-B/16's 197 tokens,
   padded to 198 behind cuDNN's padding mask, DiT-XL/2's head dimension of 72, GPT-B's causal
   1024 tokens, and a causal 197 padded): cuDNN's fused attention in the
   compiled program where layers/attentions.fused_kernel names it (XLA's path on a CPU,
   where this script also runs), and its loss and gradients against the einsum reference.
3. KV-cache decoding equals the full forward pass on the device (float32).
Prints one line per check and exits non-zero if any fails.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit('/tools/', 1)[0])

from layers.attentions import CUDNN_CUSTOM_CALL, attend, fused_kernel  # noqa: E402


def check_attention() -> bool:
  ok = True
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(4, 256, 8, 64)).astype(np.float32) for _ in range(3))
  for dtype, tol in ((jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)):
    args = [jnp.asarray(a, dtype) for a in (q, k, v)]
    for causal in (False, True):
      ref = np.asarray(jax.jit(lambda *a: attend(*a, causal=causal))(*args), np.float32)
      for impl in ('xla', 'cudnn'):
        try:
          out = jax.jit(lambda *a: attend(*a, causal=causal, impl=impl))(*args)
          err = float(np.abs(np.asarray(out, np.float32) - ref).max())
          good = err < tol
          print(f'attention {impl:5s} {jnp.dtype(dtype).name:8s} causal={causal!s:5s} '
                f'max|diff| vs einsum {err:.2e} (tol {tol:g}) {"OK" if good else "FAIL"}')
        except Exception as e:  # cuDNN may reject a dtype/shape: report, do not hide
          good = impl == 'cudnn' and dtype == jnp.float32   # cuDNN attention is bf16/fp16 only
          print(f'attention {impl:5s} {jnp.dtype(dtype).name:8s} causal={causal!s:5s} '
                f'raised {type(e).__name__}: {str(e)[:120]} {"(expected)" if good else "FAIL"}')
        ok &= good
  return ok


def check_auto_attention() -> bool:
  ok = True
  rng = np.random.default_rng(1)
  for name, (b, l, n, h), causal in (('ViT-B/16', (8, 197, 12, 64), False),
                                     ('DiT-XL/2', (8, 256, 16, 72), False),
                                     ('GPT-B', (4, 1024, 12, 64), True),
                                     ('causal odd', (4, 197, 12, 64), True)):   # padded, masked
    q, k, v = (jnp.asarray(rng.normal(size=(b, l, n, h)), jnp.bfloat16) for _ in range(3))
    def grads(impl):
      loss = lambda q, k, v: jnp.sum(attend(q, k, v, causal=causal, impl=impl)
                                     .astype(jnp.float32) ** 2)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    auto = grads('auto')
    try:
      fused = CUDNN_CUSTOM_CALL in auto.lower(q, k, v).compile().as_text()
      want = fused_kernel(q) == 'cudnn'
      (value, got), (ref_value, ref) = auto(q, k, v), grads('einsum')(q, k, v)
      rel = lambda x, y: float(jnp.linalg.norm((x - y).astype(jnp.float32))
                               / jnp.linalg.norm(y.astype(jnp.float32)))
      err = max([rel(value, ref_value)] + [rel(x, y) for x, y in zip(got, ref)])
      good = fused == want and err < 2e-2
      print(f"attention auto {name:8s} l={l:4d} h={h:3d} causal={causal!s:5s} "
            f"{'cuDNN' if fused else 'XLA'} (expected {'cuDNN' if want else 'XLA'}), loss and "
            f"gradients vs einsum rel. error {err:.2e} (tol 2e-2) {'OK' if good else 'FAIL'}")
    except Exception as e:  # report, do not hide
      good = False
      print(f'attention auto {name:8s} raised {type(e).__name__}: {str(e)[:160]} FAIL')
    ok &= good
  return ok


def check_decode() -> bool:
  from flax import linen as nn
  from models.gpt import GPT
  model = GPT(vocab_size=512, max_len=64, hidden=128, depth=2, heads=4)
  tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 512)
  params = jax.jit(lambda r: nn.unbox(model.init(r, tokens))['params'])(jax.random.key(1))
  with jax.default_matmul_precision('highest'):
    full = jax.jit(lambda p: model.apply({'params': p}, tokens))(params)
    dec = model.clone(decode=True)
    cache = dec.init(jax.random.key(2), jnp.zeros((2, 40), jnp.int32))['cache']
    logits, upd = dec.apply({'params': params, 'cache': cache}, tokens[:, :24], mutable=['cache'])
    errs = [float(jnp.abs(logits - full[:, :24]).max())]
    step = jax.jit(lambda c, t: dec.apply({'params': params, 'cache': c}, t, mutable=['cache']))
    cache = upd['cache']
    for pos in range(24, 40):
      logits, upd = step(cache, tokens[:, pos:pos + 1])
      cache = upd['cache']
      errs.append(float(jnp.abs(logits[:, 0] - full[:, pos]).max()))
  good = max(errs) < 1e-4
  print(f'kv-cache decode vs full forward (16 steps): max|diff| {max(errs):.2e} '
        f'{"OK" if good else "FAIL"}')
  return good


if __name__ == '__main__':
  print('devices:', jax.devices())
  results = [check_attention(), check_auto_attention(), check_decode()]
  sys.exit(0 if all(results) else 1)
