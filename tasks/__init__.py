"""What is optimised and how it is evaluated, one objective per file.

A task is a plain object holding its hyper-parameters, with
  loss(model, params, batch, rng) -> (scalar loss, metrics dict)   # the training objective
  eval_step(model, params, batch, rng=None) -> dict of sums (masked rows excluded); the
      evaluator passes a fixed key per eval batch for objectives that draw noise
  finalize(sums) -> dict of eval metrics
so the trainer never knows which objective it runs.
"""
