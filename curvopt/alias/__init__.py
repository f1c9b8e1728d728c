"""Layer 4: the named optimizers, each a short `optax.chain` of layer-3 transforms."""

from curvopt.alias._adahessian import adahessian as adahessian
from curvopt.alias._egn import egn as egn
from curvopt.alias._lazy_newton import lazy_newton as lazy_newton
from curvopt.alias._mfac import mfac as mfac
from curvopt.alias._newton_cg import newton_cg as newton_cg
from curvopt.alias._psgd import psgd_dense as psgd_dense
from curvopt.alias._psgd import psgd_kron as psgd_kron
from curvopt.alias._psgd import psgd_lra as psgd_lra
from curvopt.alias._psgd_muon import psgd_muon as psgd_muon
from curvopt.alias._sam import gam as gam
from curvopt.alias._sam import sam as sam
from curvopt.alias._shampoo import shampoo as shampoo
from curvopt.alias._soap import soap as soap
from curvopt.alias._sophia import sophia_h as sophia_h
