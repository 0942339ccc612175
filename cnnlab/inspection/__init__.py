"""Looking at a model or a run: summary, pictures, plots, BN diagnostics."""
