"""GPT: a causal language model (GPT-2 layout: learned positions, pre-norm, tied output table).

Shapes: b batch, l length, d model, v vocabulary.

  tokens [b, l] --token table + learned positions--> [b, l, d] -> depth causal blocks
  -> final norm -> logits [b, l, v] (the token table reused as output projection when tied)

The token table (and an untied head) has `padded_vocab` rows, vocab_size rounded up to a
multiple of `vocab_multiple` (50257 -> 50304 with 128): the output matmul then has a size that
tiles the hardware's matmul units. Logits of the padding ids are never returned or trained on.
Given targets, the model returns per-token losses instead of logits, computed `loss_chunk`
tokens at a time (layers/heads.token_cross_entropy) so that the float32 logits of the whole
batch never exist at once, and with `loss_vocab_block` streamed over that many vocabulary rows
at a time, so that no logits of the whole vocabulary exist at all.

Decoding: build with `decode=True`, init on a [b, max_len] dummy to size the KV cache, then
apply with `mutable=['cache']`: once on the prompt (prefill), then once per new token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from layers.embeddings import Embed, PositionEmbed
from layers.heads import CPU_VOCAB_BLOCK, token_cross_entropy, vocab_logits
from layers.normalizations import LayerNorm
from layers.sharding import local_shape, shard
from layers.transformers import SIZES, Backbone, block_flops  # noqa: F401  (SIZES: for users)

# The loss's chunk where GPT.chunk_for decides: all logits at once while a device's share of them
# takes at most this much of its memory, else this many positions at a time.
LOGITS_MEMORY_FRACTION = 1 / 8
AUTO_LOSS_CHUNK = 128


class GPT(nn.Module):
  vocab_size: int
  max_len: int
  hidden: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  tie_embeddings: bool = True
  vocab_multiple: int = 128
  loss_chunk: int | None = 0       # positions per cross-entropy chunk; 0: all logits at once;
                                   # None: `chunk_for` decides from the device's memory
  loss_vocab_block: int | None = None   # vocabulary rows per streamed cross-entropy block
                                        # (0: not streamed; None: `streamed_vocab_block`)
  attention_impl: str = 'einsum'
  remat: str | bool = False
  scan_layers: bool = False
  scan_unroll: int = 1
  decode: bool = False
  dtype: jnp.dtype = jnp.float32
  residual_dtype: jnp.dtype = jnp.float32   # the blocks' residual stream (layers/transformers)
  fused_qkv: bool = False
  init_std: float = 0.02           # GPT-2's init (layers/transformers.Backbone); 0: Xavier

  @property
  def padded_vocab(self) -> int:
    m = max(self.vocab_multiple, 1)
    return -(-self.vocab_size // m) * m

  @property
  def streamed_vocab_block(self) -> int:
    """The loss's vocabulary block: `loss_vocab_block`, or when None heads.CPU_VOCAB_BLOCK on the
    CPU backend, where streaming made GPT_T_Bible's step 1.3x faster, and 0 (the full logits)
    elsewhere, where it has not been measured (docs/PERFORMANCE.md)."""
    if self.loss_vocab_block is not None:
      return self.loss_vocab_block
    return CPU_VOCAB_BLOCK if jax.default_backend() == 'cpu' else 0

  def chunk_for(self, b: int, l: int, memory_bytes: int | None = None) -> int:
    """The loss's chunk for a [b, l] batch: `loss_chunk`, or when None 0 (all logits at once)
    where a device's share of the batch's float32 logits takes at most LOGITS_MEMORY_FRACTION
    of its memory (`memory_bytes`, default what JAX's allocator may use on the first local
    device, its `bytes_limit`), else AUTO_LOSS_CHUNK.

    On one H200 (2026-12-04, docs/PERFORMANCE.md) GPT-B's step at 32 x 1024 tokens ran 1.15x
    faster unchunked, for 6.1 GiB of logits and a peak of 25.0 GiB instead of 17.5, while
    GPT_S_OWT's batch of 480 on one device would hold 92 GiB. Where the device reports no memory
    (a CPU) it is AUTO_LOSS_CHUNK; the CPU streams the vocabulary anyway
    (`streamed_vocab_block`)."""
    if self.loss_chunk is not None:
      return self.loss_chunk
    if memory_bytes is None:
      stats = jax.local_devices()[0].memory_stats() or {}
      memory_bytes = stats.get('bytes_limit')
    if not memory_bytes:
      return AUTO_LOSS_CHUNK
    local_b, local_l = local_shape((b, l), ('act_batch', 'act_len'))
    logits_bytes = local_b * local_l * self.padded_vocab * 4
    return 0 if logits_bytes <= memory_bytes * LOGITS_MEMORY_FRACTION else AUTO_LOSS_CHUNK

  @nn.compact
  def __call__(self, tokens: jax.Array, targets: jax.Array | None = None):
    """Logits [b, l, vocab_size]; with `targets` [b, l] instead (nll [b, l], correct [b, l])."""
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
    embed = Embed(self.padded_vocab, self.hidden, dtype=self.dtype, name='token_embed')
    h = embed(tokens) + PositionEmbed(self.max_len, self.hidden, dtype=self.dtype,
                                      name='pos_embed')(start + jnp.arange(l))[None]
    h = shard(h, ('act_batch', 'act_len', 'act_embed'))
    h = Backbone(self.depth, self.heads, self.mlp_ratio, causal=True, norm_eps=1e-5,
                 attention_impl=self.attention_impl, remat=self.remat, scan=self.scan_layers,
                 scan_unroll=self.scan_unroll,
                 residual_dtype=self.residual_dtype, fused_qkv=self.fused_qkv,
                 init_std=self.init_std, decode=self.decode, dtype=self.dtype,
                 name='backbone')(h)
    h = LayerNorm(1e-5, dtype=self.dtype, name='final_norm')(h)
    if self.tie_embeddings:
      table = embed.embedding                                               # [v, d]
    else:
      table = self.param('head', nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ('vocab', 'embed')), (self.padded_vocab, self.hidden),
          jnp.float32)
    if targets is not None:
      return token_cross_entropy(h, table, targets, self.vocab_size, self.chunk_for(b, l),
                                 self.dtype, self.streamed_vocab_block)
    logits = vocab_logits(h, table, self.vocab_size, self.dtype)[..., :self.vocab_size]
    return shard(logits, ('act_batch', 'act_len', 'act_vocab'))            # [b, l, v] float32


def causal_skipped_flops(seq_len: int, hidden: int, depth: int) -> int:
  """Forward FLOPs per sequence of the attention entries above the diagonal, which
  flops_per_example counts (as the einsum and XLA paths compute them) and a fused causal kernel
  skips: q k^T and probs v over l (l - 1) / 2 masked entries in each block. The kernel skips
  whole tiles, so it computes a little more than the triangle that is left."""
  return depth * 2 * 2 * hidden * (seq_len * (seq_len - 1) // 2)


def flops_per_example(seq_len: int, hidden: int, depth: int, vocab_size: int,
                      mlp_ratio: float = 4.0, **_) -> int:
  """Forward matmul FLOPs for one sequence of `seq_len` tokens (2 per multiply-add), over the
  real vocabulary: the padding columns are not useful work."""
  d = hidden
  return depth * block_flops(seq_len, d, int(d * mlp_ratio)) + 2 * seq_len * d * vocab_size
