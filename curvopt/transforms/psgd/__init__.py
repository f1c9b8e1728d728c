"""PSGD: one driver (key, coin flip, probes, damping, initial scale) and the Lie-group
preconditioner families it fits (Kronecker, low-rank plus diagonal, dense). Public names
live in `curvopt.transforms`."""
