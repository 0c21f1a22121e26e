"""Scaling studies: FLOP accounting, compute sweeps, fits and plots."""
