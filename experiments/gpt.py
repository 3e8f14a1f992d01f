"""GPT experiments: autoregressive language modelling on GPT-2 BPE tokens."""
from __future__ import annotations

import fiddle as fdl

from experiments import data
from experiments.base import AtScale, Experiment
from models import gpt
from tasks.language import LanguageModeling


class GPT(Experiment, abstract=True):
  LR = 6e-4
  WARMUP = 2000
  LR_SCHEDULE = 'cosine'
  WEIGHT_DECAY = 0.1
  ADAM_B2 = 0.95
  TIE_EMBEDDINGS = True            # the token table is the output layer, and is not decayed
  INIT_STD = 0.02                  # GPT-2 / nanoGPT: normal(0.02), residual projections scaled
                                   # by 1/sqrt(2 DEPTH); 0: Xavier-uniform as the other families
  VOCAB_MULTIPLE = 128             # the token table's rows: VOCAB_SIZE rounded up to a multiple
  LOSS_CHUNK = None                # positions per cross-entropy chunk; 0: none; None: none where
                                   # the logits take at most 1/8 of the device, else 128
                                   # (models/gpt.GPT.chunk_for)
  LOSS_VOCAB_BLOCK = None          # vocabulary rows per streamed cross-entropy block (0: none;
                                   # None: 2048 on the CPU backend, else none; models/gpt.py)
  SAMPLE_PROMPT = '\n'
  SAMPLE_TOKENS = 64
  TEMPERATURE = 0.8                # sampling: 0 is greedy
  TOP_K = 40                       # keep the k most likely tokens (None: all)
  TOP_P = None                     # nucleus: keep the most likely tokens holding this much

  def model(self):
    return fdl.Config(gpt.GPT, vocab_size=self.VOCAB_SIZE, max_len=self.SEQ_LEN,
                      hidden=self.HIDDEN, depth=self.DEPTH, heads=self.HEADS,
                      mlp_ratio=self.MLP_RATIO, tie_embeddings=self.TIE_EMBEDDINGS,
                      vocab_multiple=self.VOCAB_MULTIPLE, loss_chunk=self.LOSS_CHUNK,
                      loss_vocab_block=self.LOSS_VOCAB_BLOCK,
                      init_std=self.INIT_STD,
                      **self.backbone_fields())

  def task(self):
    return fdl.Config(LanguageModeling, seq_len=self.SEQ_LEN, sample_prompt=self.SAMPLE_PROMPT,
                      sample_tokens=self.SAMPLE_TOKENS, temperature=self.TEMPERATURE,
                      top_k=self.TOP_K, top_p=self.TOP_P)

  def flops_per_example(self):
    return gpt.flops_per_example(self.SEQ_LEN, self.HIDDEN, self.DEPTH, self.VOCAB_SIZE,
                                 self.MLP_RATIO)

  def tokens_per_example(self):
    return self.SEQ_LEN


class GPT_T_Bible(data.BibleData, GPT):
  """GPT-T on the King James Bible: `python launch.py --exp=GPT_T_Bible
  --workdir=workdirs/gpt_t_bible`. About 4 minutes on a 2-core AVX-512 CPU, 14 on the slowest
  machine measured before the streamed loss (1200 steps of 4 x 128 tokens, 0.66 epochs; the
  50257-way output layer dominates on a CPU). Four sequences a step:
  at the same tokens, batches of 2 / 4 / 8 reached held-out 4.74 / 4.79 / 4.94 (batch 2 was
  not timed on both cores). Held-out loss (the first 25.6k tokens of the held-out chapters, as
  before the batch changed) and a generated passage are in docs/RESULTS.md."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['T']
  SEQ_LEN = 128
  GLOBAL_BATCH = 4
  LR = 2e-3                    # 1e-3 and 6e-3 were worse (docs/RESULTS.md)
  WARMUP = 30
  WEIGHT_DECAY = 0.1
  NUM_STEPS = 1200
  LOG_EVERY = 40
  EVAL_EVERY = 600
  EVAL_BATCHES = 50            # 50 x 4 x 128 tokens
  CKPT_EVERY = 600
  SAMPLE_PROMPT = 'And God said'


class GPT_T_Synthetic(data.SyntheticTokenData, GPT):
  """Tiny GPT on synthetic counting sequences, for tests: `python launch.py
  --exp=GPT_T_Synthetic --workdir=workdirs/gpt`. About 20 s on a CPU; the training loss goes
  from 6.1 at step 5 to 5.5 at step 20."""
  HIDDEN, DEPTH, HEADS = 64, 2, 4
  VOCAB_SIZE = 512
  SEQ_LEN = 32
  GLOBAL_BATCH = 16
  NUM_STEPS = 20
  LR = 3e-3
  WARMUP = 5
  LOG_EVERY = 5
  EVAL_EVERY = 10
  EVAL_BATCHES = 2
  CKPT_EVERY = 10
  SAMPLE_TOKENS = 8


class GPT_S_OWT(AtScale, data.OpenWebTextData, GPT):
  """GPT-S (384/12/6, 41M with tied embeddings) on OpenWebText at 1024 tokens:
  prepare the tokens once with `python tools/build_dataset.py openwebtext --data_dir=D
  [--source=M]` (M: .txt/.jsonl/.parquet files offline), then `python launch.py --exp=GPT_S_OWT
  --workdir=W --set DATA_DIR=D`. Expect a validation loss above GPT-B's ~2.85 (no measured
  run yet); one H200 ran 626K tokens/s with cuDNN attention, so the 295B-token schedule takes
  about 5.5 days there."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['S']
  GLOBAL_BATCH = 480
  NUM_STEPS = 600_000
  LOG_EVERY = 100
  EVAL_EVERY = 5_000
  EVAL_BATCHES = 50
  CKPT_EVERY = 5_000
  DATA_WORKERS = 2


class GPT_B_OWT(GPT_S_OWT):
  """GPT-B (768/12/12, the GPT-2 small shape, 124M tied) on OpenWebText: `python launch.py
  --exp=GPT_B_OWT --workdir=W --set DATA_DIR=D` after preparing openwebtext (see GPT_S_OWT).
  nanoGPT reaches ~2.85 validation loss with this shape after
  600K steps of 480 x 1024 tokens (about 4 days on 8 A100s there)."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['B']


class GPT_L_OWT(GPT_S_OWT):
  """GPT-L (1024/24/16, the GPT-2 medium shape, ~355M) on OpenWebText: `python launch.py
  --exp=GPT_L_OWT --workdir=W --set DATA_DIR=D` after preparing openwebtext. GPT-2 medium's weights score ~2.84 on OpenWebText (nanoGPT);
  roughly 3x GPT-B's time at equal tokens (FLOPs estimate)."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['L']


class GPT_XL_OWT(GPT_S_OWT):
  """GPT-XL (1152/28/16, ~505M) on OpenWebText, the DiT-XL backbone as a language model:
  `python launch.py --exp=GPT_XL_OWT --workdir=W --set DATA_DIR=D` after preparing
  openwebtext (see GPT_S_OWT). Expect a validation loss below GPT-L's at equal tokens (no
  measured run yet); roughly 4x GPT-B's time (FLOPs estimate)."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['XL']


class GPT_S_Synthetic(AtScale, data.SyntheticTokenData, GPT):
  """GPT-S at 1024 tokens on synthetic data, the speed benchmark's workload: `python
  tools/benchmark.py --exp=GPT_S_Synthetic`. One H200: 52 ms per step of 32 x 1024 (cuDNN)."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['S']
  SEQ_LEN = 1024
  GLOBAL_BATCH = 32


class GPT_B_Synthetic(GPT_S_Synthetic):
  """GPT-B (the GPT-2 small shape) at 1024 tokens on synthetic data, the speed benchmark's
  language workload: `python tools/benchmark.py --exp=GPT_B_Synthetic`."""
  HIDDEN, DEPTH, HEADS = gpt.SIZES['B']
