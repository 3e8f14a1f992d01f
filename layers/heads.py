"""Output heads: classifier, DiT's final adaLN layer with patch output, and a language model's
softmax cross-entropy over a large vocabulary computed in chunks of tokens or streamed over blocks
of the vocabulary."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers import matmuls
from layers.convolutions import Conv
from layers.embeddings import unpatchify, unpatchify_overlapping
from layers.linears import Dense
from layers.normalizations import LayerNorm
from layers.transformers import AdaLNModulation


class ClassifierHead(nn.Module):
  """norm + Dense to logits [.., classes] ('embed', 'vocab'), zero-initialised as in big_vision."""
  num_classes: int
  norm_eps: float = 1e-6
  zero_init: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, return_features: bool = False):
    """Logits; with `return_features`, (logits, the normalised input they are a linear map of)."""
    x = LayerNorm(self.norm_eps, dtype=self.dtype, name='norm')(x)
    init = nn.initializers.zeros_init() if self.zero_init else None
    logits = Dense(self.num_classes, ('embed', 'vocab'), kernel_init=init, dtype=self.dtype,
                   name='proj')(x)
    return (logits, x) if return_features else logits


class FinalAdaLN(nn.Module):
  """DiT's last layer: adaLN (shift, scale) on a bare norm, then a zero-init Dense to patches,
  unpatchified back to [b, H, W, c].

  With `conv_features` k > 0 the Dense writes k channels a pixel instead, and a 3x3 convolution
  (zero-initialised, so the model still starts at zero output) maps them to the c channels:
  each pixel then also sees the tokens of the neighbouring patches, which the linear decoder
  alone cannot, and whose absence shows as blocks at patch borders. U-ViT (Bao et al. 2023)
  puts a 3x3 convolution after its linear decoder for the same reason.

  With `overlap` the Dense writes a 2p x 2p block a token instead, centred on its patch and
  summed with its neighbours' where they overlap (embeddings.unpatchify_overlapping).

  With `wrap` the image is a torus: overlapping blocks and the convolution's window reach around
  the border to the opposite side instead of into zeros."""
  patch: int
  channels: int
  height: int
  width: int
  norm_eps: float = 1e-6
  conv_features: int = 0
  overlap: bool = False
  wrap: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    if self.overlap and self.conv_features:
      raise ValueError('choose one decoder: overlap or conv_features')
    shift, scale = AdaLNModulation(2, x.shape[-1], dtype=self.dtype, name='adaln')(c)
    x = LayerNorm(self.norm_eps, use_scale=False, use_bias=False, dtype=self.dtype)(x, shift,
                                                                                    scale)
    k = self.conv_features or self.channels
    # zero-init here would leave the convolution's input and its gradient at zero for good
    init = None if self.conv_features else nn.initializers.zeros_init()
    side = 2 * self.patch if self.overlap else self.patch
    x = Dense(side * side * k, ('embed', 'patch'), kernel_init=init, dtype=self.dtype,
              name='proj')(x)
    if self.overlap:
      return unpatchify_overlapping(x, self.patch, self.height, self.width, self.wrap)
    x = unpatchify(x, self.patch, self.height, self.width)
    if self.conv_features:
      padding = 'SAME'
      if self.wrap:
        x, padding = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='wrap'), 'VALID'
      x = Conv(self.channels, (3, 3), padding=padding, kernel_init=nn.initializers.zeros_init(),
               dtype=self.dtype, name='conv')(x)
    return x


def vocab_logits(h, table, vocab_size: int, dtype=jnp.float32):
  """h [..., d] against an output table [v_padded, d] -> float32 logits [..., v_padded] whose
  padding columns (ids >= vocab_size) are -inf: no padding id is ever predicted or sampled."""
  lead = 'abcefghijk'[:h.ndim - 1]
  logits = matmuls.einsum(f'{lead}d,vd->{lead}v', h, table, dtype, out_dtype=jnp.float32)
  if table.shape[0] > vocab_size:
    logits = jnp.where(jnp.arange(table.shape[0]) < vocab_size, logits, -jnp.inf)
  return logits


def label_logit(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """logits [..., v] at integer labels [...] in [-v, v) (negative ones count from the end, as
  take_along_axis's) -> [...], whose gradient is a one-hot select that fuses into the softmax's
  (autodiff of the gather is a scatter into zeros, a pass of its own)."""
  v = logits.shape[-1]
  return _label_logit(v, logits, _from_zero(labels, v))


def _from_zero(labels, v):
  """Labels in [-v, v) as ids in [0, v): negative ones count from the end."""
  return jnp.where(labels < 0, labels + v, labels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _label_logit(v, logits, labels):
  return jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def _label_logit_fwd(v, logits, labels):
  return _label_logit(v, logits, labels), labels


def _label_logit_bwd(v, labels, g):
  one_hot = jnp.arange(v) == labels[..., None]
  return jnp.where(one_hot, g[..., None], jnp.zeros((), g.dtype)), None


_label_logit.defvjp(_label_logit_fwd, _label_logit_bwd)


def token_cross_entropy(h, table, targets, vocab_size: int, chunk: int = 0,
                        dtype=jnp.float32, vocab_block: int = 0):
  """Per-token softmax cross-entropy and top-1 hits of next-token logits h . table^T.

  h [b, l, d] final hidden states, table [v_padded, d] (the tied token table, or an untied head),
  targets int [b, l] -> (nll float32 [b, l], correct bool [b, l]).

  With `chunk` > 0 the positions are processed `chunk` at a time (all b rows of them together,
  so a batch sharded over devices stays sharded) under jax.checkpoint: only [b, chunk, v] float32
  logits exist at once, in the forward pass and again in the backward pass, which recomputes
  them. With a GPT-2 vocabulary the whole batch's logits are b*l*50304*4 bytes (1.6 GiB at
  8 x 1024 tokens), the memory peak of a small model's step. `chunk` = 0 materialises all of them
  (the reference path); both give the same numbers.

  With `vocab_block` > 0 each chunk's loss streams over the vocabulary instead, that many rows
  of the table at a time (vocab_blocked_cross_entropy): no [.., v] array is made at all, which
  on a CPU also makes the step faster. The two compose.
  """
  def terms(hc, tc):
    if vocab_block:
      lead = hc.shape[:-1]
      nll, correct = vocab_blocked_cross_entropy(hc.reshape(-1, hc.shape[-1]), table,
                                                 tc.reshape(-1), vocab_size, vocab_block, dtype)
      return nll.reshape(lead), correct.reshape(lead)
    logits = vocab_logits(hc, table, vocab_size, dtype)                    # [.., v]
    # Plain reductions and elementwise passes over the vocabulary only: XLA's CPU backend runs
    # argmax's (value, index) reduction unvectorised and take_along_axis's gradient as a
    # scatter, which together took half of GPT_T_Bible's step (docs/PERFORMANCE.md).
    top = jax.lax.stop_gradient(logits.max(-1))              # lse's gradient needs no max
    # an infinite max shifts by 0 instead (as jax.nn.logsumexp): the loss is then inf, not NaN
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    lse = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
    hit = label_logit(logits, tc)
    # a tie for the top logit counts as a hit (argmax would pick the lowest id of the tied ones;
    # exact float ties do not occur in practice, and finding the lowest costs another pass)
    return lse - hit, hit >= top
  b, l, d = h.shape
  if not chunk or chunk >= l:
    return terms(h, targets)
  pad = -l % chunk
  hs = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
  ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
  nll, correct = jax.lax.map(lambda args: jax.checkpoint(terms)(*args), (hs, ts))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, l + pad)[:, :l]
  return unchunk(nll), unchunk(correct)


# On a 2-core CPU (docs/PERFORMANCE.md) GPT_T_Bible's loss alone took 91 ms in blocks of 1572 or
# 2096 rows, 103 in blocks of 1048; its whole step ran within noise from 786 to 12576 rows
CPU_VOCAB_BLOCK = 2048


def vocab_blocked_cross_entropy(h, table, targets, vocab_size: int, block: int,
                                dtype=jnp.float32):
  """token_cross_entropy's (nll, correct) for h [n, d], table [v_padded, d], targets int [n],
  computed over the vocabulary `block` rows of the table at a time, never all n x v logits.

  The forward pass keeps a running max and a running sum of exponentials (the log-sum-exp of a
  streamed softmax); the backward pass recomputes each block's logits and turns them at once
  into that block's share of both gradients. Every [n, block] array is then made and used while
  it is in cache. On a 2-core CPU the [512, 50304] float32 logits of GPT_T_Bible's step (103 MB)
  made its three vocabulary matmuls run at a third of the machine's matmul rate, bound by
  memory, and the passes of the softmax over them cost as much again (docs/PERFORMANCE.md). The
  recomputation is a fourth matmul of the same size.

  Blocks are the largest divisor of v_padded in (block / 2, block] rows wide (the gradient's
  blocks then are the table's gradient without a copy), or, where there is none, `block` rows
  wide with the last one starting `v_padded - block` rows in and masking the rows an earlier
  block already took."""
  v = table.shape[0]
  return _vocab_blocked(vocab_size, block_rows(v, block), jnp.dtype(dtype), h, table,
                        _from_zero(targets, v))


def block_rows(rows: int, block: int) -> int:
  """The rows per block vocab_blocked_cross_entropy takes for a table of `rows` rows when asked
  for `block`."""
  if block >= rows:
    return rows
  return next((b for b in range(block, block // 2, -1) if rows % b == 0), block)


def _block_logits(i, hd, table, vocab_size, block, dtype):
  """Block i's float32 logits [n, block] (-inf where masked) from hd (h in `dtype`), its rows'
  ids [block] (-1 where masked) and its rows of the table in `dtype`."""
  nominal = i * block
  start = jnp.minimum(nominal, table.shape[0] - block)
  rows = jax.lax.dynamic_slice_in_dim(table, start, block).astype(dtype)
  logits = jnp.einsum('nd,vd->nv', hd, rows, preferred_element_type=jnp.float32)
  ids = start + jnp.arange(block)
  valid = (ids >= nominal) & (ids < vocab_size)
  return jnp.where(valid, logits, -jnp.inf), jnp.where(valid, ids, -1), rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _vocab_blocked(vocab_size, block, dtype, h, table, targets):
  return _vocab_blocked_fwd(vocab_size, block, dtype, h, table, targets)[0]


def _vocab_blocked_fwd(vocab_size, block, dtype, h, table, targets):
  n, hd = h.shape[0], h.astype(dtype)

  def step(carry, i):
    top, shift, total, hit = carry
    logits, ids, _ = _block_logits(i, hd, table, vocab_size, block, dtype)
    top = jnp.maximum(top, logits.max(-1))
    # an infinite max shifts by 0 (as jax.nn.logsumexp): the loss is then inf, not NaN
    new_shift = jnp.where(jnp.isfinite(top), top, 0.0)
    total = (total * jnp.exp(shift - new_shift)
             + jnp.sum(jnp.exp(logits - new_shift[:, None]), axis=-1))
    hit = hit + jnp.sum(jnp.where(ids == targets[:, None], logits, 0.0), axis=-1)
    return (top, new_shift, total, hit), None

  zeros = jnp.zeros((n,), jnp.float32)
  count = -(-table.shape[0] // block)
  (top, shift, total, hit), _ = jax.lax.scan(
      step, (jnp.full((n,), -jnp.inf), zeros, zeros, zeros), jnp.arange(count))
  lse = shift + jnp.log(total)
  # a tie for the top logit counts as a hit, as in token_cross_entropy
  return (lse - hit, hit >= top), (h, table, targets, lse)


def _vocab_blocked_bwd(vocab_size, block, dtype, saved, cotangents):
  h, table, targets, lse = saved
  g = cotangents[0].astype(jnp.float32)
  hd = h.astype(dtype)

  def step(dh, i):
    logits, ids, rows = _block_logits(i, hd, table, vocab_size, block, dtype)
    # d nll / d logits = softmax - one-hot; masked ids have probability exp(-inf) = 0
    dlogits = g[:, None] * (jnp.exp(logits - lse[:, None])
                            - (ids == targets[:, None]).astype(jnp.float32))
    dlogits = dlogits.astype(dtype)
    dh = dh + jnp.einsum('nv,vd->nd', dlogits, rows, preferred_element_type=jnp.float32)
    # made [d, block] and transposed while in cache: XLA's CPU matmul contracts the logits'
    # major axis 2.4x faster into that form than into [block, d] (docs/PERFORMANCE.md)
    return dh, jnp.einsum('nd,nv->dv', hd, dlogits, preferred_element_type=jnp.float32).T

  v, d = table.shape
  count = -(-v // block)
  dh, drows = jax.lax.scan(step, jnp.zeros(h.shape, jnp.float32), jnp.arange(count))
  if count * block == v:
    dtable = drows.reshape(v, d)
  else:  # the last block overlaps the one before; its overlap's share is zero
    tail = v - (count - 1) * block
    dtable = jnp.concatenate([drows[:-1].reshape(-1, d), drows[-1, block - tail:]])
  return dh.astype(h.dtype), dtable.astype(table.dtype), None


_vocab_blocked.defvjp(_vocab_blocked_fwd, _vocab_blocked_bwd)
