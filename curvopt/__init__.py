"""curvopt: second-order optimization and curvature analysis in JAX.

Layers, each importing only the ones before it:

1. `curvopt.oracles`: matrix-free curvature operators (Hessian, Gauss-Newton,
   empirical Fisher, data-set accumulation) over parameter pytrees.
2. `curvopt.estimators`: Hutchinson, Hutch++, power iteration, Lanczos,
   stochastic Lanczos quadrature and sharpness on those operators.
3. `curvopt.transforms`: optax transforms (curvature estimators and the
   `scale_by_*` steps that consume them).
4. the named optimizers (`curvopt.adahessian`, `curvopt.sophia_h`,
   `curvopt.shampoo`, `curvopt.soap`, `curvopt.psgd_kron`,
   `curvopt.psgd_lra`, `curvopt.psgd_dense`, `curvopt.psgd_muon`, `curvopt.sam`, `curvopt.gam`,
   `curvopt.egn`, `curvopt.lazy_newton`, `curvopt.mfac`, `curvopt.newton_cg`),
   each a short `optax.chain` of transforms.
"""

from curvopt import checkpoint as checkpoint
from curvopt import estimators as estimators
from curvopt import oracles as oracles
from curvopt import transforms as transforms
from curvopt._cubic_subproblem import cubic_subproblem as cubic_subproblem
from curvopt._cubic_subproblem import regularized_newton_step as regularized_newton_step
from curvopt._matrix_roots import InverseRoot as InverseRoot
from curvopt._matrix_roots import matrix_inverse_root as matrix_inverse_root
from curvopt.alias import adahessian as adahessian
from curvopt.alias import egn as egn
from curvopt.alias import gam as gam
from curvopt.alias import lazy_newton as lazy_newton
from curvopt.alias import mfac as mfac
from curvopt.alias import newton_cg as newton_cg
from curvopt.alias import psgd_dense as psgd_dense
from curvopt.alias import psgd_kron as psgd_kron
from curvopt.alias import psgd_lra as psgd_lra
from curvopt.alias import psgd_muon as psgd_muon
from curvopt.alias import sam as sam
from curvopt.alias import shampoo as shampoo
from curvopt.alias import soap as soap
from curvopt.alias import sophia_h as sophia_h
from curvopt.alias._inject_hyperparams import inject_hyperparams as inject_hyperparams
from curvopt.alias._inject_hyperparams import structural_args as structural_args
from curvopt.estimators import DiagonalEstimate as DiagonalEstimate
from curvopt.estimators import Eigenpairs as Eigenpairs
from curvopt.estimators import LanczosDecomposition as LanczosDecomposition
from curvopt.estimators import PowerIterationResult as PowerIterationResult
from curvopt.estimators import SharpnessEstimate as SharpnessEstimate
from curvopt.estimators import SpectralDensity as SpectralDensity
from curvopt.estimators import TraceEstimate as TraceEstimate
from curvopt.estimators import estimate_sharpness as estimate_sharpness
from curvopt.estimators import hutchinson_diagonal as hutchinson_diagonal
from curvopt.estimators import hutchinson_trace as hutchinson_trace
from curvopt.estimators import hutchpp_trace as hutchpp_trace
from curvopt.estimators import lanczos as lanczos
from curvopt.estimators import lanczos_eigenpairs as lanczos_eigenpairs
from curvopt.estimators import power_iteration as power_iteration
from curvopt.estimators import sharpness as sharpness
from curvopt.estimators import spectral_density as spectral_density
from curvopt.oracles import POSITIVE_SEMIDEFINITE as POSITIVE_SEMIDEFINITE
from curvopt.oracles import SYMMETRIC as SYMMETRIC
from curvopt.oracles import LinearOperator as LinearOperator
from curvopt.oracles import compose as compose
from curvopt.oracles import dataset_operator as dataset_operator
from curvopt.oracles import diagonal_operator as diagonal_operator
from curvopt.oracles import empirical_fisher as empirical_fisher
from curvopt.oracles import gauss_newton as gauss_newton
from curvopt.oracles import gauss_newton_factor as gauss_newton_factor
from curvopt.oracles import hessian as hessian
from curvopt.oracles import hvp as hvp
from curvopt.oracles import is_positive_semidefinite as is_positive_semidefinite
from curvopt.oracles import is_symmetric as is_symmetric
from curvopt.oracles import linear_operator as linear_operator
from curvopt.oracles import preconditioned as preconditioned
from curvopt.oracles import random_vector as random_vector
from curvopt.oracles import restrict as restrict
from curvopt.oracles import to_lineax as to_lineax
from curvopt.oracles import value_grad_hvp as value_grad_hvp
from curvopt.transforms import StateSize as StateSize
from curvopt.transforms import masked as masked
from curvopt.transforms import multi_transform as multi_transform
from curvopt.transforms import state_size as state_size

__version__ = "0.1.0.dev0"


def __getattr__(name: str):
  # The flax integrations import flax, an optional dependency: load them on first use.
  if name in ("nnx", "linen"):
    import importlib

    return importlib.import_module(f"curvopt.{name}")
  raise AttributeError(f"module 'curvopt' has no attribute {name!r}")
