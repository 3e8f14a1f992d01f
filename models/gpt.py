"""GPT: a causal language model (GPT-2 layout: learned positions, pre-norm, tied output table).

Shapes: b batch, l length, d model, v vocabulary.

  tokens [b, l] --token table + learned positions--> [b, l, d] -> depth causal blocks
  -> final norm -> logits [b, l, v] (the token table reused as output projection when tied)

Decoding: build with `decode=True`, init on a [b, max_len] dummy to size the KV cache, then
apply with `mutable=['cache']`: once on the prompt (prefill), then once per new token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.embeddings import Embed, PositionEmbed
from layers.linears import Dense
from layers.normalizations import LayerNorm
from layers.sharding import shard
from layers.transformers import SIZES, Backbone, block_flops  # noqa: F401  (SIZES: for users)


class GPT(nn.Module):
  vocab_size: int
  max_len: int
  hidden: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  tie_embeddings: bool = True
  attention_impl: str = 'einsum'
  remat: bool = False
  decode: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, l = tokens.shape
    if self.hidden % self.heads:
      raise ValueError(f'hidden {self.hidden} is not divisible by heads {self.heads}')
    if l > self.max_len:
      raise ValueError(f'sequence length {l} exceeds max_len {self.max_len}')
    start = 0
    if self.decode:  # absolute position of the first token of this call
      initialised = self.has_variable('cache', 'position')
      index = self.variable('cache', 'position', lambda: jnp.array(0, jnp.int32))
      start = index.value
      if initialised:  # the init call only sizes the cache
        index.value = start + l
    embed = Embed(self.vocab_size, self.hidden, dtype=self.dtype, name='token_embed')
    h = embed(tokens) + PositionEmbed(self.max_len, self.hidden, dtype=self.dtype,
                                      name='pos_embed')(start + jnp.arange(l))[None]
    h = shard(h, ('act_batch', 'act_len', 'act_embed'))
    h = Backbone(self.depth, self.heads, self.mlp_ratio, causal=True, norm_eps=1e-5,
                 attention_impl=self.attention_impl, remat=self.remat, decode=self.decode,
                 dtype=self.dtype, name='backbone')(h)
    h = LayerNorm(1e-5, dtype=self.dtype, name='final_norm')(h)
    if self.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = Dense(self.vocab_size, ('embed', 'vocab'), use_bias=False, dtype=self.dtype,
                     kernel_init=nn.initializers.normal(0.02), name='head')(h)
    logits = shard(logits, ('act_batch', 'act_len', 'act_vocab'))
    return logits.astype(jnp.float32)                                       # [b, l, v]


def flops_per_example(seq_len: int, hidden: int, depth: int, vocab_size: int,
                      mlp_ratio: float = 4.0, **_) -> int:
  """Forward matmul FLOPs for one sequence of `seq_len` tokens (2 per multiply-add)."""
  d = hidden
  return depth * block_flops(seq_len, d, int(d * mlp_ratio)) + 2 * seq_len * d * vocab_size
