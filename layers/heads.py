"""Output heads: classifier, DiT's final adaLN layer with patch output, and a language model's
softmax cross-entropy over a large vocabulary computed in chunks of tokens."""
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
  summed with its neighbours' where they overlap (embeddings.unpatchify_overlapping)."""
  patch: int
  channels: int
  height: int
  width: int
  norm_eps: float = 1e-6
  conv_features: int = 0
  overlap: bool = False
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
      return unpatchify_overlapping(x, self.patch, self.height, self.width)
    x = unpatchify(x, self.patch, self.height, self.width)
    if self.conv_features:
      x = Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros_init(),
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
  return _label_logit(v, logits, jnp.where(labels < 0, labels + v, labels))


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
                        dtype=jnp.float32):
  """Per-token softmax cross-entropy and top-1 hits of next-token logits h . table^T.

  h [b, l, d] final hidden states, table [v_padded, d] (the tied token table, or an untied head),
  targets int [b, l] -> (nll float32 [b, l], correct bool [b, l]).

  With `chunk` > 0 the positions are processed `chunk` at a time (all b rows of them together,
  so a batch sharded over devices stays sharded) under jax.checkpoint: only [b, chunk, v] float32
  logits exist at once, in the forward pass and again in the backward pass, which recomputes
  them. With a GPT-2 vocabulary the whole batch's logits are b*l*50304*4 bytes (1.6 GiB at
  8 x 1024 tokens), the memory peak of a small model's step. `chunk` = 0 materialises all of them
  (the reference path); both give the same numbers.
  """
  def terms(hc, tc):
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
