"""Layer 2: randomized and Krylov estimators on curvature operators.

Each estimator takes a `LinearOperator` and a PRNG key, runs a fixed maximum
number of iterations in a `lax` loop (or unrolled, see `_loops`), optionally
stops early at a tolerance, and returns a NamedTuple with convergence
information. All are pure functions: call them inside your `jax.jit`.
"""

from curvopt.estimators._fisher_inverse import inverse_fisher_diagonal as inverse_fisher_diagonal
from curvopt.estimators._fisher_inverse import obs_scores as obs_scores
from curvopt.estimators._hutchinson import DiagonalEstimate as DiagonalEstimate
from curvopt.estimators._hutchinson import TraceEstimate as TraceEstimate
from curvopt.estimators._hutchinson import hutchinson_diagonal as hutchinson_diagonal
from curvopt.estimators._hutchinson import hutchinson_trace as hutchinson_trace
from curvopt.estimators._hutchpp import hutchpp_trace as hutchpp_trace
from curvopt.estimators._lanczos import Eigenpairs as Eigenpairs
from curvopt.estimators._lanczos import LanczosDecomposition as LanczosDecomposition
from curvopt.estimators._lanczos import lanczos as lanczos
from curvopt.estimators._lanczos import lanczos_eigenpairs as lanczos_eigenpairs
from curvopt.estimators._power import PowerIterationResult as PowerIterationResult
from curvopt.estimators._power import power_iteration as power_iteration
from curvopt.estimators._sharpness import SharpnessEstimate as SharpnessEstimate
from curvopt.estimators._sharpness import estimate_sharpness as estimate_sharpness
from curvopt.estimators._sharpness import sharpness as sharpness
from curvopt.estimators._slq import SpectralDensity as SpectralDensity
from curvopt.estimators._slq import spectral_density as spectral_density
