"""The Experiment base class, its registry, and command-line overrides.

An experiment is a class. UPPER_CASE attributes are its knobs (plain values); methods turn them
into Fiddle configs, so a subclass that changes HIDDEN changes everything derived from it:

    class MyDiT(DiT_T_FashionMNIST):
      HIDDEN = 192
      NUM_STEPS = 5000

Every concrete subclass registers itself under its class name; families and data mixins pass
`abstract=True`. `--exp=my_pkg.my_exps.MyDiT` imports the module first, so experiments defined
outside this repository are found too.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
from typing import Any

import fiddle as fdl

from layers import attentions, transformers
from trainer import state as state_lib
from trainer.optimizer import adamw

REGISTRY: dict[str, type['Experiment']] = {}


class ConfigError(ValueError):
  """A bad experiment name, override or knob value; the message says how to fix it."""


@dataclasses.dataclass
class LoopSettings:
  """What the training loop needs besides model, task, data and optimizer."""
  num_steps: int
  global_batch: int
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  eval_batches: int = 0            # 0: the whole eval split
  sample_every: int = 0            # 0: only at the end
  ckpt_every: int = 1000
  keep_ckpts: int = 3
  ema_decay: float = 0.0
  max_bad_steps: int = 10          # consecutive non-finite steps (updates skipped) before stopping
  mesh: dict = dataclasses.field(default_factory=lambda: {'data': 1, 'fsdp': -1, 'tensor': 1})
  grad_sync: str = 'auto'          # trainer/state.resolve_grad_sync
  flops_per_example: int = 0       # forward matmul FLOPs, for TFLOP/s and MFU
  tokens_per_example: int = 0      # > 0 for language models: logs perf/tokens_per_s
  experiment: str = ''


@dataclasses.dataclass
class RunConfig:
  model: Any
  task: Any
  train_data: Any
  eval_data: Any
  optimizer: Any
  loop: LoopSettings
  codec: Any = None                # a frozen model between images and the model (a VAE)
  judge: Any = None                # how a generator's samples are scored (tasks.fid.SampleJudge)


class Experiment:
  """Knobs shared by every family. Override in subclasses or with `--set KNOB=VALUE`."""
  NUM_STEPS = 1000
  GLOBAL_BATCH = 64
  SEED = 0
  LR = 1e-4
  WARMUP = 100
  LR_SCHEDULE = 'constant'        # 'constant' | 'cosine'
  # AdamW's decoupled decay as optax and PyTorch define it: multiplied by the learning rate, so
  # each step scales every decayed weight by (1 - lr_t * WEIGHT_DECAY) and the decay follows the
  # schedule. Recipes that state a decay not multiplied by the LR (big_vision's `wd`) divide it
  # by the peak LR here.
  WEIGHT_DECAY = 0.0
  ADAM_B1 = 0.9
  ADAM_B2 = 0.999
  GRAD_CLIP = 1.0                 # global-norm clipping; 0 disables
  EMA_DECAY = 0.0                 # 0: no EMA parameters
  DTYPE = 'float32'               # compute dtype; parameters stay float32
  RESIDUAL_DTYPE = 'float32'      # dtype of the blocks' residual stream
  FUSED_QKV = False               # q, k, v in one matmul (the same parameters: speed only)
  HIDDEN = 128
  DEPTH = 6
  HEADS = 4
  MLP_RATIO = 4.0
  PATCH = 2
  ATTENTION_IMPL = 'einsum'       # 'einsum' | 'xla' | 'cudnn' | 'splash' | 'auto'
  # what the backward pass recomputes: 'none' | 'full' | 'dots_saveable' (keeps matmul outputs)
  # | 'dots_with_no_batch_dims_saveable' (jax.checkpoint_policies)
  REMAT = 'none'
  # nn.scan over the blocks, their params stacked on a 'layers' axis: compile time independent of
  # DEPTH; on CPU under glibc's malloc 1.07-1.13x faster train steps than unrolled at depth 6,
  # but under TCMalloc (trainer/allocator.py) the depth-6 DiT and ViT ran 1.07-1.09x faster unrolled
  # (docs/PERFORMANCE.md); False: one module per block, initialised with the scanned draw
  # (trainer/state.init_params), so only speed changes
  SCAN_LAYERS = True
  # SCAN_LAYERS: blocks per iteration of the scan's loop (DEPTH: none), the parameters still
  # stacked; the CPU bfloat16 DiT at depth 6 ran 1.04x faster unrolled (docs/PERFORMANCE.md)
  SCAN_UNROLL = 1
  LOG_EVERY = 50
  EVAL_EVERY = 500
  EVAL_BATCHES = 0
  SAMPLE_EVERY = 0
  CKPT_EVERY = 1000
  KEEP_CKPTS = 3
  MESH = {'data': 1, 'fsdp': -1, 'tensor': 1}
  # JAX devices a CPU-only host is split into (trainer/host_devices.py says why); 1 is JAX's own
  # default. The environment's XLA_FLAGS device count or JAX_NUM_CPU_DEVICES wins over it.
  CPU_DEVICES = 1
  # how data shards sum their gradients: 'spmd' (XLA's partitioner, per parameter), 'flat' (one
  # all-reduce of them all; data-parallel meshes only) or 'auto' ('flat' on a data-parallel CPU
  # mesh, where it made the 2-device ViT step 1.08-1.12x faster: docs/PERFORMANCE.md)
  GRAD_SYNC = 'auto'
  MAX_BAD_STEPS = 10              # consecutive steps with non-finite loss/grads, then stop

  # Knob ranges checked by validate(), for whichever of them an experiment has.
  AT_LEAST_ONE = ('NUM_STEPS', 'GLOBAL_BATCH', 'LOG_EVERY', 'EVAL_EVERY', 'CKPT_EVERY',
                  'KEEP_CKPTS', 'HIDDEN', 'DEPTH', 'HEADS', 'PATCH', 'MAX_BAD_STEPS',
                  'IMAGE_SIZE', 'SEQ_LEN', 'VOCAB_SIZE', 'VOCAB_MULTIPLE', 'NUM_CLASSES',
                  'DENOISE_STEPS', 'CPU_DEVICES', 'SCAN_UNROLL')
  AT_LEAST_ZERO = ('SAMPLE_EVERY', 'LOSS_CHUNK', 'LOSS_VOCAB_BLOCK', 'EVAL_BATCHES', 'WARMUP',
                   'WEIGHT_DECAY', 'INIT_STD', 'GRAD_CLIP', 'SEED', 'FID_NUM', 'FID_EVERY',
                   'FID_BATCH', 'DATA_WORKERS', 'DECODER_CONV')
  # Knobs whose default, None, means "decided when the model runs": None or an integer.
  INT_OR_NONE = ('LOSS_CHUNK', 'LOSS_VOCAB_BLOCK')
  CHOICES = {'LR_SCHEDULE': ('constant', 'cosine'), 'DTYPE': ('float32', 'bfloat16'),
             'RESIDUAL_DTYPE': ('float32', 'bfloat16'),
             'ATTENTION_IMPL': attentions.IMPLEMENTATIONS, 'REMAT': transformers.REMAT_POLICIES,
             'GRAD_SYNC': state_lib.GRAD_SYNCS}

  def __init_subclass__(cls, abstract: bool = False, **kwargs):
    super().__init_subclass__(**kwargs)
    cls._abstract = abstract
    if not abstract:
      REGISTRY.setdefault(cls.__name__, cls)
      REGISTRY[f'{cls.__module__}.{cls.__qualname__}'] = cls

  # -- what families and data mixins provide ------------------------------------------------------
  def model(self) -> fdl.Config:
    raise NotImplementedError

  def task(self) -> fdl.Config:
    raise NotImplementedError

  def train_data(self) -> fdl.Config:
    raise NotImplementedError

  def eval_data(self) -> fdl.Config:
    raise NotImplementedError

  def codec(self) -> fdl.Config | None:
    """A frozen network the model sees the data through (the VAE of a latent DiT), or None."""
    return None

  def judge(self) -> fdl.Config | None:
    """How samples are scored (FID and kin, tasks/fid.py), or None: generators only."""
    return None

  def flops_per_example(self) -> int:
    return 0

  def tokens_per_example(self) -> int:
    return 0

  # -- shared -------------------------------------------------------------------------------------
  def validate(self) -> None:
    """Ranges, choices and shape arithmetic, checked before anything is built; each message
    names the knob and what would be valid."""
    knobs = self.knob_values()
    for name in self.AT_LEAST_ONE:
      if isinstance(knobs.get(name), (int, float)) and knobs[name] < 1:
        raise ConfigError(f'{name}={knobs[name]} must be at least 1')
    for name in self.AT_LEAST_ZERO:
      if isinstance(knobs.get(name), (int, float)) and knobs[name] < 0:
        raise ConfigError(f'{name}={knobs[name]} must be at least 0 (0: see the knob\'s comment)')
    for name in self.INT_OR_NONE:
      value = knobs.get(name)
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f'{name}={value!r} takes an integer, or None (see the knob\'s comment)')
    for name, choices in self.CHOICES.items():
      if name in knobs and knobs[name] not in choices:
        raise ConfigError(f'{name}={knobs[name]!r}: use one of {", ".join(map(repr, choices))}')
    if not 0 < self.LR:
      raise ConfigError(f'LR={self.LR} must be positive')
    if not 0 <= self.EMA_DECAY < 1:
      raise ConfigError(f'EMA_DECAY={self.EMA_DECAY} must be in [0, 1) (0: no EMA)')
    if self.GLOBAL_BATCH % self.CPU_DEVICES:
      raise ConfigError(f'GLOBAL_BATCH={self.GLOBAL_BATCH} does not split over '
                        f'CPU_DEVICES={self.CPU_DEVICES} devices: make one divide the other')
    if self.HIDDEN % self.HEADS:
      raise ConfigError(f'HIDDEN={self.HIDDEN} is not divisible by HEADS={self.HEADS}')
    if self.SCAN_UNROLL > 1 and not self.SCAN_LAYERS:
      raise ConfigError(f'SCAN_UNROLL={self.SCAN_UNROLL} unrolls the scan over the blocks: it '
                        'needs SCAN_LAYERS=True (SCAN_LAYERS=False already runs every block '
                        'unrolled)')

  def backbone_fields(self) -> dict[str, Any]:
    """The model fields every family's backbone takes from the shared knobs."""
    return dict(attention_impl=self.ATTENTION_IMPL, remat=self.REMAT,
                scan_layers=self.SCAN_LAYERS, scan_unroll=self.SCAN_UNROLL,
                residual_dtype=self.RESIDUAL_DTYPE,
                fused_qkv=self.FUSED_QKV, dtype=self.DTYPE)

  def optimizer(self) -> fdl.Config:
    return fdl.Config(adamw, lr=self.LR, warmup=self.WARMUP, schedule=self.LR_SCHEDULE,
                      num_steps=self.NUM_STEPS, weight_decay=self.WEIGHT_DECAY,
                      b1=self.ADAM_B1, b2=self.ADAM_B2, grad_clip=self.GRAD_CLIP)

  def loop(self) -> fdl.Config:
    return fdl.Config(
        LoopSettings, num_steps=self.NUM_STEPS, global_batch=self.GLOBAL_BATCH, seed=self.SEED,
        log_every=self.LOG_EVERY, eval_every=self.EVAL_EVERY, eval_batches=self.EVAL_BATCHES,
        sample_every=self.SAMPLE_EVERY, ckpt_every=self.CKPT_EVERY, keep_ckpts=self.KEEP_CKPTS,
        ema_decay=self.EMA_DECAY, max_bad_steps=self.MAX_BAD_STEPS, mesh=dict(self.MESH),
        grad_sync=self.GRAD_SYNC,
        flops_per_example=int(self.flops_per_example()),
        tokens_per_example=int(self.tokens_per_example()), experiment=type(self).__name__)

  def config(self) -> fdl.Config:
    self.validate()
    return fdl.Config(RunConfig, model=self.model(), task=self.task(),
                      train_data=self.train_data(), eval_data=self.eval_data(),
                      optimizer=self.optimizer(), loop=self.loop(), codec=self.codec(),
                      judge=self.judge())

  @classmethod
  def knobs(cls) -> dict[str, Any]:
    return {k: getattr(cls, k) for k in dir(cls) if k.isupper() and not k.startswith('_')
            and k not in _NOT_KNOBS}

  def knob_values(self) -> dict[str, Any]:
    """This instance's knobs, overrides included."""
    return {k: getattr(self, k) for k in type(self).knobs()}


_NOT_KNOBS = frozenset({'AT_LEAST_ONE', 'AT_LEAST_ZERO', 'CHOICES'})


class AtScale(Experiment, abstract=True):
  """Fast defaults for the experiments meant for accelerators (ImageNet, OpenWebText, CelebA-HQ,
  LSUN and their synthetic twins); put it first among the bases. bfloat16 matmuls with float32
  parameters, optimizer state and residual stream; attention through the fused kernel where
  the backend has one ('auto': cuDNN on NVIDIA GPUs, the Pallas splash kernel on TPUs, XLA's
  elsewhere; layers/attentions);
  the blocks unrolled (SCAN_LAYERS=False): on one H200 (2026-12-04, docs/PERFORMANCE.md, XLA's
  attention) the scanned ViT-B/16 step was 1.16x slower, a quarter of it in copies, and the
  scanned DiT-XL/2 at batch 256 asked for 128.9 GiB where the unrolled one peaks at 99.3.
  `--set DTYPE=float32 --set ATTENTION_IMPL=einsum` gives the plain reference path, `--set
  SCAN_LAYERS=True` compile times that do not grow with DEPTH."""
  DTYPE = 'bfloat16'
  ATTENTION_IMPL = 'auto'
  SCAN_LAYERS = False


# -- lookup ---------------------------------------------------------------------------------------
def _import_experiment_modules() -> None:
  for name in ('experiments.dit', 'experiments.vit', 'experiments.gpt', 'experiments.vae'):
    importlib.import_module(name)


def registered() -> dict[str, type[Experiment]]:
  """Short name -> class for every concrete experiment."""
  _import_experiment_modules()
  return {k: v for k, v in sorted(REGISTRY.items()) if '.' not in k}


def get(name: str) -> type[Experiment]:
  """Find an experiment by class name, or by `module.path.ClassName` (importing the module)."""
  _import_experiment_modules()
  if name in REGISTRY:
    return REGISTRY[name]
  if '.' in name:
    module, _, cls_name = name.rpartition('.')
    try:
      mod = importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f'--exp={name}: cannot import module {module!r} ({e})') from None
    cls = getattr(mod, cls_name, None)
    if inspect.isclass(cls) and issubclass(cls, Experiment) and not cls._abstract:
      return cls
    raise ConfigError(f'--exp={name}: module {module!r} has no concrete Experiment subclass '
                      f'named {cls_name!r}')
  close = difflib.get_close_matches(name, list(registered()), n=5, cutoff=0.5)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  raise ConfigError(f'unknown experiment {name!r}.{hint} (--exp=list shows all)')


# -- overrides ------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
  """Python literal if it parses as one ('3', '1e-4', 'True', "{'fsdp': 4}"), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_override(item: str) -> tuple[str, Any]:
  if '=' not in item:
    raise ConfigError(f'--set {item!r}: expected KEY=VALUE')
  key, _, value = item.partition('=')
  return key.strip(), parse_value(value.strip())


def build_config(name: str, overrides: list[str] = ()) -> tuple[Experiment, fdl.Config]:
  """Experiment instance and its config with overrides applied.

  Knob overrides (UPPER_CASE) are set on the experiment first, so derived values follow them;
  then dotted Fiddle paths (`model.depth=2`) edit the finished config, each group in order.
  """
  cls = get(name)
  exp = cls()
  pairs = [split_override(o) for o in overrides]
  knobs = cls.knobs()
  for key, value in pairs:
    if '.' in key:
      continue
    if key not in knobs:
      close = difflib.get_close_matches(key, list(knobs), n=3, cutoff=0.5)
      hint = f' Did you mean: {", ".join(close)}?' if close else ''
      raise ConfigError(f'--set {key}: {cls.__name__} has no knob {key!r}.{hint}')
    check_type(key, value, knobs[key])
    setattr(exp, key, value)
  cfg = exp.config()
  for key, value in pairs:
    if '.' in key:
      set_path(cfg, key, value)
  return exp, cfg


def check_type(key: str, value: Any, default: Any) -> None:
  """An override must have its knob's kind of value: an int for an int knob (a float such as
  1e3 is refused rather than truncated), a number for a float, a string for a string, ...
  A knob whose default is None takes anything."""
  if default is None or value is None and not isinstance(default, (int, float)):
    return
  if isinstance(default, bool):
    ok, kind = isinstance(value, bool), 'True or False'
  elif isinstance(default, int):
    ok, kind = isinstance(value, int) and not isinstance(value, bool), 'an integer'
  elif isinstance(default, float):
    ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), 'a number'
  elif isinstance(default, str):
    ok, kind = isinstance(value, str), 'a string'
  elif isinstance(default, (tuple, list)):
    ok, kind = isinstance(value, (tuple, list)), 'a tuple'
  elif isinstance(default, dict):
    ok, kind = isinstance(value, dict), "a dict such as {'fsdp': 4}"
  else:
    return
  if not ok:
    raise ConfigError(f'--set {key}={value!r}: {key} takes {kind} (default {default!r})')


def set_path(cfg: fdl.Config, path: str, value: Any) -> None:
  node, parts = cfg, path.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, fdl.Buildable):
      raise ConfigError(f'--set {path}: {".".join(parts[:i])} is a plain value, not a config')
    params = inspect.signature(fdl.get_callable(node)).parameters
    if part not in params:
      close = difflib.get_close_matches(part, list(params), n=3, cutoff=0.5)
      hint = f' Did you mean: {", ".join(close)}?' if close else ''
      where = '.'.join(parts[:i]) or 'the run config'
      raise ConfigError(f'--set {path}: {where} has no field {part!r}.{hint}')
    if i == len(parts) - 1:
      setattr(node, part, value)
    else:
      node = getattr(node, part)
