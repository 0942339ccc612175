"""One training run: steps, loop, mesh, seeds, checkpoints, run directory, writers."""
