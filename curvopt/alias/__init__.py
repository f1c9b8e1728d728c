"""Layer 4: the named optimizers, each a short `optax.chain` of layer-3 transforms."""

from curvopt.alias._adahessian import adahessian as adahessian
from curvopt.alias._shampoo import shampoo as shampoo
from curvopt.alias._soap import soap as soap
from curvopt.alias._sophia import sophia_h as sophia_h
