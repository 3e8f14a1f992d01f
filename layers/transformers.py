"""The backbone: pre-norm blocks of attention + MLP, optionally adaLN-Zero conditioned.

Shapes: b batch, l length, d model. x is [b, l, d]; the conditioning vector c is [b, d].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers import matmuls
from layers.attentions import SelfAttention
from layers.linears import Dense
from layers.mlps import Mlp
from layers.normalizations import LayerNorm, reduce_to
from layers.sharding import shard

ACT = ('act_batch', 'act_len', 'act_embed')

# Backbone sizes shared by every family: hidden, depth, heads (MLP ratio 4), as in DiT's Table 1.
SIZES = {
    'T': (128, 6, 4), 'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
}


class AdaLNModulation(nn.Module):
  """c [b, d] -> `num` vectors [b, d] (shifts, scales, gates) from SiLU + Dense.

  Zero-initialised (adaLN-Zero, Peebles & Xie 2023): gates start at 0, so every conditioned
  block starts as the identity and the network as its skip path.
  """
  num: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> list[jax.Array]:
    zeros = nn.initializers.zeros_init()
    y = Dense(self.num * self.features, ('embed', 'mlp'), kernel_init=zeros, dtype=self.dtype,
              name='proj')(nn.silu(c))
    return jnp.split(y[:, None, :], self.num, axis=-1)                      # num x [b, 1, d]


@jax.custom_vjp
def _gate_16bit(gate: jax.Array, h: jax.Array) -> jax.Array:
  return gate * h


def _gate_fwd(gate, h):
  return gate * h, (matmuls.pack_residual(gate), matmuls.pack_residual(h))


def _gate_bwd(saved, g):
  gate, h = (matmuls.unpack_residual(v, g.dtype) for v in saved)
  gate_grad = reduce_to(g.astype(jnp.float32) * h.astype(jnp.float32), gate.shape)
  return gate_grad.astype(gate.dtype), g * gate


_gate_16bit.defvjp(_gate_fwd, _gate_bwd)


def gate_branch(gate: jax.Array, h: jax.Array, cpu_kernels: bool | None = None) -> jax.Array:
  """adaLN-Zero's gate [b, 1, d] times a branch's output h [b, l, d], in h's dtype.

  On the CPU backend (`cpu_kernels`; None: decided by the backend) with 16-bit floats what the
  backward pass keeps of it goes through matmuls.pack_residual (autodiff would keep both as
  16-bit arrays, which SCAN_LAYERS stacks slowly there) and the gate's gradient is summed in
  float32. Float32 and accelerators take the plain product, as before."""
  gate = gate.astype(h.dtype)
  return _gate_16bit(gate, h) if matmuls.cpu_16bit(h.dtype, cpu_kernels) else gate * h


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)); with `conditioned`, adaLN-Zero shift/scale/gate."""
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  conditioned: bool = False
  norm_eps: float = 1e-6
  attention_impl: str = 'einsum'
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  residual_dtype: jnp.dtype = jnp.float32
  fused_qkv: bool = False
  init_std: float = 0.0        # > 0: normal(init_std) weights instead of Xavier-uniform ...
  out_init_std: float = 0.0    # ... and this std for the two projections into the residual

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array | None = None) -> jax.Array:
    d = x.shape[-1]
    affine = not self.conditioned  # adaLN supplies scale and shift itself
    norm = lambda name: LayerNorm(self.norm_eps, use_scale=affine, use_bias=affine,
                                  dtype=self.dtype, name=name)
    if self.conditioned:
      if c is None:
        raise ValueError('a conditioned Block needs the conditioning vector c')
      shift1, scale1, gate1, shift2, scale2, gate2 = AdaLNModulation(
          6, d, dtype=self.dtype, name='adaln')(c)
    # The residual stream keeps its own dtype (float32 by default): in bfloat16 the small
    # updates of deep blocks would round away. The branches compute in `dtype`.
    x = shard(x.astype(self.residual_dtype), ACT)
    h = norm('norm1')(x, shift1, scale1) if self.conditioned else norm('norm1')(x)
    h = SelfAttention(self.num_heads, causal=self.causal, impl=self.attention_impl,
                      decode=self.decode, fused_qkv=self.fused_qkv, dtype=self.dtype,
                      init_std=self.init_std, out_init_std=self.out_init_std, name='attn')(h)
    x = x + (gate_branch(gate1, h) if self.conditioned else h).astype(x.dtype)
    h = norm('norm2')(x, shift2, scale2) if self.conditioned else norm('norm2')(x)
    h = Mlp(int(d * self.mlp_ratio), dtype=self.dtype, init_std=self.init_std,
            out_init_std=self.out_init_std, name='mlp')(h)
    x = x + (gate_branch(gate2, h) if self.conditioned else h).astype(x.dtype)
    return shard(x, ACT)


REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable')


def remat_policy(remat: str | bool):
  """REMAT knob -> (recompute?, jax.checkpoint policy). True/False are 'full'/'none'."""
  name = {True: 'full', False: 'none'}.get(remat, remat) if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f'remat {remat!r}: use one of {REMAT_POLICIES}')
  if name == 'none':
    return False, None
  if name == 'full':
    return True, None
  # the CPU's 16-bit matmuls (layers/matmuls.py) hide their dot from the policy: saved by name
  names = (matmuls.MATMUL,) if 'no_batch_dims' in name else (matmuls.MATMUL,
                                                               matmuls.BATCHED_MATMUL)
  return True, jax.checkpoint_policies.save_from_both_policies(
      getattr(jax.checkpoint_policies, name), jax.checkpoint_policies.save_only_these_names(*names))


class _ScanBlock(Block):
  """A Block in nn.scan's (carry, xs) -> (carry, ys) form; c is broadcast to every layer."""

  @nn.compact
  def __call__(self, x, c):
    return super().__call__(x, c), None


class Backbone(nn.Module):
  """`depth` Blocks.

  `remat` ('none' | 'full' | 'dots_saveable' | 'dots_with_no_batch_dims_saveable', or a bool)
  recomputes each block's activations in the backward pass, keeping what the policy saves.
  `scan` runs one Block under nn.scan: its parameters are stacked on a leading 'layers' axis
  (params['blocks'][...] of shape [depth, ...] instead of params['block0'] ... ['block{depth-1}']),
  and the program holds one block body, so compile time does not grow with depth. It also keeps
  XLA from fusing the backward pass across blocks, which on CPU duplicates elementwise work
  quadratically in depth. `scan_unroll` blocks run in each iteration of the scan's loop (depth:
  no loop at all): the same stacked parameters and the same function, with compile time growing
  with the unroll instead (on CPU in bfloat16 at depth 6 it bought 1.04x; docs/PERFORMANCE.md).
  """
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  conditioned: bool = False
  norm_eps: float = 1e-6
  attention_impl: str = 'einsum'
  remat: str | bool = 'none'
  scan: bool = False
  scan_unroll: int = 1
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  residual_dtype: jnp.dtype = jnp.float32
  fused_qkv: bool = False
  # > 0: GPT-2's initialisation, normal(init_std) weights with the attention output and MLP
  # output projections at init_std / sqrt(2 depth), as each block adds two of them to the
  # residual stream (Radford et al. 2019); 0: Xavier-uniform throughout
  init_std: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array | None = None) -> jax.Array:
    recompute, policy = remat_policy(self.remat)
    x = x.astype(self.residual_dtype)   # a scan's carry keeps one dtype throughout
    fields = (self.num_heads, self.mlp_ratio, self.causal, self.conditioned, self.norm_eps,
              self.attention_impl, self.decode, self.dtype, self.residual_dtype, self.fused_qkv,
              self.init_std, self.init_std / (2 * self.depth) ** 0.5)
    if self.scan_unroll < 1:
      raise ValueError(f'scan_unroll={self.scan_unroll} must be at least 1')
    if self.scan_unroll > 1 and not self.scan:
      raise ValueError(f'scan_unroll={self.scan_unroll} applies to a scanned backbone: set '
                       'scan=True, or leave scan_unroll at 1')
    if self.scan:
      block_cls = _ScanBlock
      if recompute:
        block_cls = nn.remat(block_cls, prevent_cse=False, policy=policy)
      stack = nn.scan(block_cls, variable_axes={'params': 0, 'cache': 0},
                      split_rngs={'params': True}, in_axes=nn.broadcast, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'},
                      unroll=min(self.scan_unroll, self.depth))
      x, _ = stack(*fields, name='blocks')(x, c)
      return x
    block_cls = nn.remat(Block, prevent_cse=True, policy=policy) if recompute else Block
    for i in range(self.depth):
      x = block_cls(*fields, name=f'block{i}')(x, c)
    return x


def stack_blocks(backbone_params: dict, depth: int) -> dict:
  """Params of an unrolled Backbone ({'block0': ..., ...}) -> the scanned layout ({'blocks':
  each leaf stacked on a leading [depth] axis}). Works on any tree with that top level (the
  params, an EMA copy, optimizer moments shaped like the params)."""
  missing = [f'block{i}' for i in range(depth) if f'block{i}' not in backbone_params]
  if missing:
    raise ValueError(f'not an unrolled backbone of depth {depth}: no {missing[0]}')
  blocks = [backbone_params[f'block{i}'] for i in range(depth)]
  rest = {k: v for k, v in backbone_params.items() if not _is_block_key(k)}
  return {**rest, 'blocks': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


def unstack_blocks(backbone_params: dict) -> dict:
  """Inverse of `stack_blocks`: {'blocks': [depth, ...] leaves} -> {'block0': ..., ...}. Leaves
  still boxed with logical names (nn.LogicallyPartitioned, as `init` returns them) lose the
  leading 'layers' name with the axis."""
  if 'blocks' not in backbone_params:
    raise ValueError('not a scanned backbone: no "blocks" entry')
  stacked = backbone_params['blocks']
  boxed = lambda x: isinstance(x, nn.Partitioned)
  first = jax.tree.leaves(stacked, is_leaf=boxed)[0]
  depth = (first.value if boxed(first) else first).shape[0]

  def take(x, i):
    if boxed(x):
      return x.replace(value=x.value[i], names=x.names[1:])
    return x[i]

  rest = {k: v for k, v in backbone_params.items() if k != 'blocks'}
  return {**rest, **{f'block{i}': jax.tree.map(lambda x, i=i: take(x, i), stacked, is_leaf=boxed)
                     for i in range(depth)}}


def unstack_all(params):
  """Every scanned backbone in a params tree (a dict holding 'blocks') unstacked, wherever it
  sits: the model's whole tree -> its SCAN_LAYERS=False layout."""
  if not isinstance(params, dict):
    return params
  if 'blocks' in params:
    params = unstack_blocks(params)
  return {k: unstack_all(v) for k, v in params.items()}


def _is_block_key(key: str) -> bool:
  return key.startswith('block') and key[5:].isdigit()


def block_flops(length: int, dim: int, mlp_dim: int, conditioned: bool = False) -> int:
  """Forward matmul FLOPs of one Block for one example (2 per multiply-add).

  Counts the full l x l attention matrix (q k^T and probs v) even when causal: that is what the
  einsum and XLA paths compute.
  """
  l, d, f = length, dim, mlp_dim
  flops = 2 * l * d * 3 * d + 2 * 2 * l * l * d + 2 * l * d * d + 2 * 2 * l * d * f
  if conditioned:
    flops += 2 * d * 6 * d  # adaLN projection: once per example, not per token
  return flops
