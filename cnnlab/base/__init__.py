"""Foundations: errors, numerics, digests, signals, locks."""
