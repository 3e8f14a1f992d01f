"""The training loop and its parts: mesh, state, checkpoints, summaries, FLOPs."""
