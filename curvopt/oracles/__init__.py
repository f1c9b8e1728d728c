"""Layer 1: matrix-free curvature operators over parameter pytrees.

Nothing here holds state or imports optax transforms: operators are values
built from a loss (or a model and a loss) at a point, and the estimators,
transforms and optimizers above are built on them.
"""

from curvopt.oracles._dataset import dataset_operator as dataset_operator
from curvopt.oracles._fisher import empirical_fisher as empirical_fisher
from curvopt.oracles._gauss_newton import gauss_newton as gauss_newton
from curvopt.oracles._gauss_newton_factor import GaussNewtonFactor as GaussNewtonFactor
from curvopt.oracles._gauss_newton_factor import gauss_newton_factor as gauss_newton_factor
from curvopt.oracles._hessian import hessian as hessian
from curvopt.oracles._hessian import hvp as hvp
from curvopt.oracles._hessian import value_grad_hvp as value_grad_hvp
from curvopt.oracles._lineax import to_lineax as to_lineax
from curvopt.oracles._operator import POSITIVE_SEMIDEFINITE as POSITIVE_SEMIDEFINITE
from curvopt.oracles._operator import SYMMETRIC as SYMMETRIC
from curvopt.oracles._operator import LinearOperator as LinearOperator
from curvopt.oracles._operator import compose as compose
from curvopt.oracles._operator import diagonal_operator as diagonal_operator
from curvopt.oracles._operator import is_positive_semidefinite as is_positive_semidefinite
from curvopt.oracles._operator import is_symmetric as is_symmetric
from curvopt.oracles._operator import linear_operator as linear_operator
from curvopt.oracles._operator import preconditioned as preconditioned
from curvopt.oracles._operator import restrict as restrict
from curvopt.oracles._output_loss import OutputCurvature as OutputCurvature
from curvopt.oracles._output_loss import SigmoidCrossEntropy as SigmoidCrossEntropy
from curvopt.oracles._output_loss import SoftmaxCrossEntropy as SoftmaxCrossEntropy
from curvopt.oracles._output_loss import SquaredError as SquaredError
from curvopt.oracles._output_loss import output_curvature as output_curvature
from curvopt.oracles._probes import random_vector as random_vector
