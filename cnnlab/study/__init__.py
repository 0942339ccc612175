"""Studies: sweeps, launchers, collection, reports, statistics, pretraining."""
