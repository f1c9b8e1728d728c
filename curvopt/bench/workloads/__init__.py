"""The benchmark workloads, by name."""

from collections.abc import Callable

from curvopt.bench.workloads._base import Workload as Workload
from curvopt.bench.workloads.classification import breast_cancer_logreg, digits_mlp, mnist1d_cnn
from curvopt.bench.workloads.language import char_transformer, gpt_lm
from curvopt.bench.workloads.noisy_quadratic import noisy_quadratic
from curvopt.bench.workloads.regression import diabetes_mlp, quadratic, rosenbrock
from curvopt.bench.workloads.vision import resnet_digits

WORKLOADS: dict[str, Callable[..., Workload]] = {
  "digits_mlp": digits_mlp,
  "mnist1d_cnn": mnist1d_cnn,
  "breast_cancer_logreg": breast_cancer_logreg,
  "diabetes_mlp": diabetes_mlp,
  "char_transformer": char_transformer,
  "quadratic": quadratic,
  "rosenbrock": rosenbrock,
  "noisy_quadratic": noisy_quadratic,
  "gpt_lm": gpt_lm,
  "resnet_digits": resnet_digits,
}
