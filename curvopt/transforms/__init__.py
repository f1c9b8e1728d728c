"""Layer 3: optax transforms built on the oracles and estimators.

Curvature estimators are transforms too (as in optax's Sophia): their output
is a curvature statistic, and the `scale_by_*` transforms that consume them
take them as an argument.
"""

from curvopt.transforms._lazy_newton import LazyNewtonState as LazyNewtonState
from curvopt.transforms._lazy_newton import scale_by_lazy_newton as scale_by_lazy_newton
from curvopt.transforms._masking import masked as masked
from curvopt.transforms._masking import multi_transform as multi_transform
from curvopt.transforms._mfac import ScaleByMFACState as ScaleByMFACState
from curvopt.transforms._mfac import scale_by_mfac as scale_by_mfac
from curvopt.transforms._momentum import EmaMomentumState as EmaMomentumState
from curvopt.transforms._momentum import ema_momentum as ema_momentum
from curvopt.transforms._orthogonalize import MUON_NS_COEFFS as MUON_NS_COEFFS
from curvopt.transforms._orthogonalize import matrix_leaves as matrix_leaves
from curvopt.transforms._orthogonalize import orthogonalize as orthogonalize
from curvopt.transforms._precision import WithStateDtypeState as WithStateDtypeState
from curvopt.transforms._precision import with_float32_statistics as with_float32_statistics
from curvopt.transforms._precision import with_state_dtype as with_state_dtype
from curvopt.transforms._safety import SkipNonFiniteState as SkipNonFiniteState
from curvopt.transforms._safety import all_finite as all_finite
from curvopt.transforms._safety import skip_nonfinite as skip_nonfinite
from curvopt.transforms._sam import GradientNormAwareState as GradientNormAwareState
from curvopt.transforms._sam import Perturbation as Perturbation
from curvopt.transforms._sam import SharpnessAwareState as SharpnessAwareState
from curvopt.transforms._sam import gam_gradient as gam_gradient
from curvopt.transforms._sam import sam_gradient as sam_gradient
from curvopt.transforms._state_size import StateSize as StateSize
from curvopt.transforms._state_size import refuse_unaffordable_state as refuse_unaffordable_state
from curvopt.transforms._state_size import state_size as state_size
from curvopt.transforms.gauss_newton._egn import scale_by_egn as scale_by_egn
from curvopt.transforms.gauss_newton._levenberg_marquardt import (
  LevenbergMarquardtState as LevenbergMarquardtState,
)
from curvopt.transforms.gauss_newton._levenberg_marquardt import (
  levenberg_marquardt as levenberg_marquardt,
)
from curvopt.transforms.gauss_newton._line_search import ArmijoState as ArmijoState
from curvopt.transforms.gauss_newton._line_search import (
  gauss_newton_objective as gauss_newton_objective,
)
from curvopt.transforms.gauss_newton._line_search import (
  scale_by_armijo_backtracking as scale_by_armijo_backtracking,
)
from curvopt.transforms.gauss_newton._model import GaussNewtonModel as GaussNewtonModel
from curvopt.transforms.gauss_newton._model import Mask as Mask
from curvopt.transforms.gauss_newton._newton_cg import Curvature as Curvature
from curvopt.transforms.gauss_newton._newton_cg import NewtonCGState as NewtonCGState
from curvopt.transforms.gauss_newton._newton_cg import scale_by_newton_cg as scale_by_newton_cg
from curvopt.transforms.hessian_diagonal._adahessian import (
  ScaleByAdaHessianState as ScaleByAdaHessianState,
)
from curvopt.transforms.hessian_diagonal._adahessian import (
  scale_by_adahessian as scale_by_adahessian,
)
from curvopt.transforms.hessian_diagonal._hutchinson import (
  HutchinsonDiagonalState as HutchinsonDiagonalState,
)
from curvopt.transforms.hessian_diagonal._hutchinson import (
  flax_averaging_axes as flax_averaging_axes,
)
from curvopt.transforms.hessian_diagonal._hutchinson import (
  hutchinson_diagonal_estimator as hutchinson_diagonal_estimator,
)
from curvopt.transforms.hessian_diagonal._hutchinson import spatial_average as spatial_average
from curvopt.transforms.hessian_diagonal._sophia import ScaleBySophiaState as ScaleBySophiaState
from curvopt.transforms.hessian_diagonal._sophia import scale_by_sophia_h as scale_by_sophia_h
from curvopt.transforms.kronecker._blocks import MatrixAxes as MatrixAxes
from curvopt.transforms.kronecker._grafting import Grafting as Grafting
from curvopt.transforms.kronecker._shampoo import ScaleByShampooState as ScaleByShampooState
from curvopt.transforms.kronecker._shampoo import scale_by_shampoo as scale_by_shampoo
from curvopt.transforms.kronecker._soap import EigenbasisMethod as EigenbasisMethod
from curvopt.transforms.kronecker._soap import ScaleBySoapState as ScaleBySoapState
from curvopt.transforms.kronecker._soap import scale_by_soap as scale_by_soap
from curvopt.transforms.psgd._dense import scale_by_psgd_dense as scale_by_psgd_dense
from curvopt.transforms.psgd._driver import Fit as Fit
from curvopt.transforms.psgd._driver import PreconditionerFamily as PreconditionerFamily
from curvopt.transforms.psgd._driver import ScaleByPSGDNewtonState as ScaleByPSGDNewtonState
from curvopt.transforms.psgd._driver import ScaleByPSGDState as ScaleByPSGDState
from curvopt.transforms.psgd._driver import psgd_update_probability as psgd_update_probability
from curvopt.transforms.psgd._kron import Geometry as Geometry
from curvopt.transforms.psgd._kron import KronFactors as KronFactors
from curvopt.transforms.psgd._kron import scale_by_psgd_kron as scale_by_psgd_kron
from curvopt.transforms.psgd._lra import LowRankFactors as LowRankFactors
from curvopt.transforms.psgd._lra import scale_by_psgd_lra as scale_by_psgd_lra
