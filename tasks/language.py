"""Autoregressive language modelling: next-token loss, perplexity, sampling through the KV cache."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tasks.common import batch_mask


class LanguageModeling:
  """batch: {'tokens': int [b, l + 1], optional 'mask': [b]}; inputs are tokens[:, :-1],
  targets tokens[:, 1:]."""

  def __init__(self, seq_len: int = 0, sample_prompt: str = '\n', sample_tokens: int = 64,
               temperature: float = 0.8, top_k: int | None = 40, top_p: float | None = None):
    self.seq_len = seq_len
    self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens
    self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

  def init_inputs(self, batch_size: int):
    return (jnp.zeros((batch_size, self.seq_len), jnp.int32),)

  def samples(self, model, params, rng):
    """{'text': prompt + a sampled continuation} decoded with the GPT-2 BPE."""
    from input.tokenizer import gpt2_encoding  # the tokenizer is needed only here
    enc = gpt2_encoding()
    prompt = enc.encode(self.sample_prompt, allowed_special='all')[-self.seq_len // 2:]
    prompt = jnp.asarray([prompt], jnp.int32) % model.vocab_size
    new = min(self.sample_tokens, self.seq_len - prompt.shape[1])
    out = generate(model, params, prompt, new, rng, self.temperature, self.top_k, self.top_p)
    tokens = [int(t) for t in jax.device_get(out)[0]]
    return {'text': enc.decode([t for t in tokens if t < enc.n_vocab])}

  def continue_prompts(self, model, params, prompts, rng):
    """Held-out prompts [b, p] continued by sample_tokens tokens (fewer if they would pass
    seq_len), sampled with this task's temperature, top_k and top_p: [b, p + new]."""
    new = min(self.sample_tokens, self.seq_len - prompts.shape[1])
    return generate(model, params, prompts, new, rng, self.temperature, self.top_k, self.top_p)

  def check_batch(self, model, batch) -> None:
    """Host-side check of a batch before it reaches the devices: a token id past the embedding
    table would be read as garbage (NaN on some backends) without any error."""
    tokens = batch['tokens']
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.vocab_size:
      bad = lo if lo < 0 else hi
      raise ValueError(f'token id {bad} is outside the model\'s vocabulary of '
                       f'{model.vocab_size} (VOCAB_SIZE); set VOCAB_SIZE={max(hi + 1, 1)} or '
                       'more, or check the tokenizer that made the data')

  def loss(self, model, params, batch, rng):
    del rng
    tokens = batch['tokens']
    # per-token losses straight from the model: it never needs all the logits at once
    nll, correct = model.apply({'params': params}, tokens[:, :-1], tokens[:, 1:])  # [b, l]
    return nll.mean(), {'accuracy': correct.mean()}

  def eval_step(self, model, params, batch, rng=None):   # deterministic: rng unused
    tokens = batch['tokens']
    nll, correct = model.apply({'params': params}, tokens[:, :-1], tokens[:, 1:])
    mask = batch_mask(batch, tokens.shape[0])[:, None]
    return {'loss_sum': (nll * mask).sum(), 'correct': (correct * mask).sum(),
            'count': mask.sum() * nll.shape[1]}

  def finalize(self, sums):
    n = max(float(sums['count']), 1.0)
    loss = float(sums['loss_sum']) / n
    return {'loss': loss, 'accuracy': float(sums['correct']) / n,
            'perplexity': math.exp(min(loss, 50.0))}


def sample_logits(rng, logits, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
  """[b, v] logits -> [b] token ids; temperature 0 is greedy; top_k keeps the k largest; top_p
  keeps the smallest set of most likely tokens whose probabilities sum to at least top_p."""
  if temperature == 0:
    return logits.argmax(-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # a token stays when the tokens more likely than it hold less than top_p in all
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p'))
def generate(model, params, prompt, max_new_tokens: int, rng, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None):
  """Continue `prompt` [b, p] by `max_new_tokens` tokens with the KV cache; returns [b, p + new].

  `model` is the training model; a decoding clone with a cache of length p + new is made here.
  Jitted, compiled once per (model, prompt shape, length, sampling settings).
  """
  b, p = prompt.shape
  total = p + max_new_tokens
  decoder = model.clone(decode=True)
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), jnp.zeros((b, total), jnp.int32))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])

  def step(cache, tokens):
    logits, updates = decoder.apply({'params': params, 'cache': cache}, tokens, mutable=['cache'])
    return updates['cache'], logits[:, -1]

  cache, last = step(cache, prompt)                                          # prefill
  rngs = jax.random.split(rng, max_new_tokens)
  first = sample_logits(rngs[0], last, temperature, top_k, top_p)

  def body(carry, key):
    cache, token = carry
    cache, last = step(cache, token[:, None])
    nxt = sample_logits(key, last, temperature, top_k, top_p)
    return (cache, nxt), nxt

  _, rest = jax.lax.scan(body, (cache, first), rngs[1:])
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
