"""Mutation testing of curvopt's core, one module at a time, with mutmut.

For each module, a scratch copy of the repository gets a `[tool.mutmut]` section that
mutates that module alone and runs only the test files that cover it (mutmut then
narrows each mutant to the tests that call the mutated function). The score is killed
mutants over all mutants less those listed as equivalent in `EQUIVALENT` (a mutation
that cannot change any result, with the reason); survivors are printed so a test can be
written for each.

Run (needs `pip install mutmut`; a module takes minutes, run it in the background):
  python benchmarks/mutation_pass.py curvopt/transforms/_momentum.py
  python benchmarks/mutation_pass.py --all --table benchmarks/results/mutation.md
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Module -> its tests: files, and a -k expression where a file also tests other modules
# through it (every optimizer test builds the guard and the momentum).
MODULES = {
  "curvopt/transforms/_momentum.py": (["tests/test_momentum.py"], None),
  "curvopt/estimators/_hutchinson.py": (
    ["tests/test_estimators.py"],
    "hutch or stderr or bad_arguments",
  ),
  "curvopt/transforms/_precision.py": (
    ["tests/test_state_precision.py"],
    "not halves_the_bytes and not checkpoints",
  ),
  "curvopt/transforms/_safety.py": (
    ["tests/test_reliability.py"],
    "guard or finite or corrupted or multisteps or "
    "(faults and (adahessian or psgd_kron or soap or sam or newton_cg))",
  ),
  "curvopt/transforms/kronecker/_factors.py": (["tests/test_shampoo.py"], None),
  "curvopt/estimators/_fisher_inverse.py": (["tests/test_mfac.py"], None),
  "curvopt/transforms/_mfac.py": (["tests/test_mfac.py", "tests/test_defaults.py"], None),
  "curvopt/_matrix_roots.py": (["tests/test_shampoo.py"], "root"),
  "curvopt/estimators/_power.py": (
    ["tests/test_estimators.py"],
    "power or sharpness or bad_arguments",
  ),
  "curvopt/oracles/_hessian.py": (["tests/test_oracles.py"], None),
  "curvopt/transforms/_cadence.py": (["tests/test_cadence.py"], None),
  "curvopt/transforms/kronecker/_grafting.py": (["tests/test_grafting.py"], None),
  "curvopt/transforms/kronecker/_shampoo.py": (
    ["tests/test_shampoo_replica.py", "tests/test_shampoo.py"],
    "not root",
  ),
  "curvopt/estimators/_slq.py": (["tests/test_estimators.py"], None),
  "curvopt/estimators/_sharpness.py": (["tests/test_estimators.py"], None),
  "curvopt/estimators/_lanczos.py": (["tests/test_estimators.py"], None),
  "curvopt/_cubic_subproblem.py": (["tests/test_lazy_newton.py"], None),
  "curvopt/oracles/_fisher.py": (["tests/test_oracles.py"], None),
  "curvopt/oracles/_gauss_newton.py": (["tests/test_oracles.py"], None),
  "curvopt/oracles/_lineax.py": (["tests/test_oracles.py"], None),
  "curvopt/estimators/_loops.py": (["tests/test_loops.py"], None),
  "curvopt/estimators/_hutchpp.py": (["tests/test_estimators.py"], "hutchpp or bad_arguments"),
  "curvopt/oracles/_probes.py": (["tests/test_probes.py"], None),
  "curvopt/_tree.py": (["tests/test_tree.py"], None),
  "curvopt/transforms/_orthogonalize.py": (["tests/test_psgd_muon.py"], "orthogonalize"),
  "curvopt/transforms/_state_size.py": (["tests/test_state_size.py"], None),
  "curvopt/oracles/_output_loss.py": (["tests/test_output_loss.py"], None),
  "curvopt/transforms/_masking.py": (["tests/test_masking.py"], None),
  "curvopt/_checks.py": (["tests/test_checks.py"], None),
  "curvopt/transforms/_extra_args.py": (["tests/test_extra_args_and_grouping.py"], None),
  "curvopt/transforms/psgd/_grouping.py": (["tests/test_extra_args_and_grouping.py"], None),
  "curvopt/_jaxpr.py": (["tests/test_jaxpr_and_dataset.py"], None),
  "curvopt/oracles/_dataset.py": (["tests/test_jaxpr_and_dataset.py"], None),
  "curvopt/transforms/gauss_newton/_model.py": (["tests/test_gauss_newton_model.py"], None),
  "curvopt/transforms/gauss_newton/_line_search.py": (["tests/test_line_search.py"], None),
  "curvopt/transforms/gauss_newton/_levenberg_marquardt.py": (
    ["tests/test_levenberg_marquardt.py"],
    None,
  ),
  "curvopt/transforms/gauss_newton/_newton_cg.py": (
    ["tests/test_truncated_cg.py", "tests/test_newton_cg.py"],
    None,
  ),
  "curvopt/transforms/kronecker/_soap.py": (
    ["tests/test_soap_replica.py", "tests/test_shampoo.py"],
    "soap",
  ),
  "curvopt/oracles/_gauss_newton_factor.py": (["tests/test_gauss_newton_factor.py"], None),
  "curvopt/oracles/_operator.py": (["tests/test_oracles.py"], None),
  "curvopt/transforms/gauss_newton/_egn.py": (
    ["tests/test_egn_solver_choice.py", "tests/test_egn.py"],
    None,
  ),
  "curvopt/transforms/hessian_diagonal/_hutchinson.py": (
    ["tests/test_hessian_optimizers.py", "tests/test_defaults.py"],
    None,
  ),
  "curvopt/transforms/hessian_diagonal/_adahessian.py": (
    ["tests/test_hessian_optimizers.py", "tests/test_defaults.py"],
    None,
  ),
  "curvopt/transforms/hessian_diagonal/_sophia.py": (
    ["tests/test_hessian_optimizers.py", "tests/test_defaults.py"],
    None,
  ),
  **{
    f"curvopt/transforms/psgd/_{name}.py": (["tests/test_psgd.py", "tests/test_defaults.py"], None)
    for name in ("kron", "driver", "lra", "dense")
  },
  "curvopt/transforms/_lazy_newton.py": (["tests/test_lazy_newton.py"], None),
  "curvopt/transforms/_sam.py": (["tests/test_sam.py"], None),
  "curvopt/transforms/kronecker/_blocks.py": (["tests/test_shampoo.py"], None),
  "curvopt/_xla_cpu.py": (["tests/test_xla_cpu.py"], None),
  "curvopt/checkpoint.py": (
    ["tests/test_reliability.py", "tests/test_first_hour.py"],
    "checkpoint",
  ),
  "curvopt/nnx.py": (["tests/test_reliability.py"], "nnx"),
  "curvopt/linen.py": (["tests/test_reliability.py"], "linen"),
  # The named optimizers: their defaults (tests/test_defaults.py) and their own tests.
  **{
    f"curvopt/alias/_{name}.py": (["tests/test_defaults.py", f"tests/test_{tests}.py"], None)
    for name, tests in (
      ("adahessian", "hessian_optimizers"),
      ("sophia", "hessian_optimizers"),
      ("shampoo", "shampoo"),
      ("soap", "shampoo"),
      ("psgd", "psgd"),
      ("psgd_muon", "psgd_muon"),
      ("egn", "egn"),
      ("newton_cg", "newton_cg"),
      ("lazy_newton", "lazy_newton"),
      ("mfac", "mfac"),
      ("sam", "sam"),
    )
  },
  "curvopt/alias/_inject_hyperparams.py": (["tests/test_first_hour.py"], "inject or structural"),
}

# Mutants that cannot change a result, by mutmut's name, with the reason.
EQUIVALENT: dict[str, str] = {
  "curvopt.transforms._momentum.x_ema_momentum__mutmut_62": (
    "Nesterov's term with the update cast to the default float instead of the state's "
    "dtype: the same values, in float64 under jax_enable_x64, cast back to the update's dtype"
  ),
  "curvopt._matrix_roots.x_matrix_inverse_root__mutmut_33": (
    'float("INF") is float("inf"): Python reads the name case-insensitively'
  ),
  "curvopt._matrix_roots.x__newton_root__mutmut_77": (
    "the loop's first 'previous residual' (inf) in the default float type: inf in any "
    "type, and the body's residuals replace it from the first step"
  ),
  "curvopt._matrix_roots.x__newton_root__mutmut_79": (
    "the loop's first 'previous residual' (inf) in the default float type, as mutant 77"
  ),
  "curvopt.estimators._power.x__normalized__mutmut_12": (
    "a zero vector divided by 2 instead of 1: zero either way, and replaced by the fallback"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_32": (
    "the random start drawn in each leaf's dtype instead of the working one: it differs only "
    "in leaves narrower than the working dtype, by one rounding to the leaf's dtype, which "
    "the operator's product applies to every input anyway (mv casts each leaf to the "
    "parameters' dtype); on float32 and float64 leaves the first iterate moved by 1e-8, "
    "inside the float32 product's own error"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_36": (
    "the random start's dtype argument dropped: the same draw as mutant 32 (None)"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_60": (
    "the zero start's random fallback drawn in each leaf's dtype: as mutant 32"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_64": (
    "the zero start's random fallback with its dtype argument dropped: as mutant 32"
  ),
  "curvopt.transforms.kronecker._factors.x_pack_symmetric__mutmut_3": (
    "the triangle's size read from axis 1 instead of -1: the same length on a stack of "
    "square factors"
  ),
  "curvopt.transforms.kronecker._factors.x_pack_symmetric__mutmut_4": (
    "the triangle's size read from a square factor's other axis"
  ),
  "curvopt.oracles._gauss_newton.x__leading_dim__mutmut_6": (
    "the default for a leaf without ndim: jax.linearize's outputs are arrays, all with one"
  ),
  "curvopt.oracles._gauss_newton.x__leading_dim__mutmut_9": ("as mutant 6"),
  "curvopt.oracles._gauss_newton.x__leading_dim__mutmut_13": ("as mutant 6"),
  "curvopt.transforms.kronecker._factors.x__zero_depending_on__mutmut_4": (
    "the ordering zero taken from a leaf of any dtype: 0.0 times an integer or boolean "
    "leaf is an exact, weakly typed zero too, still computed from the previous call"
  ),
  "curvopt.transforms.kronecker._factors.x__zero_depending_on__mutmut_14": (
    "the ordering zero read from entry 1 instead of 0: zero either way (a one-entry leaf's "
    "index is clamped), and still computed from the previous call"
  ),
  "curvopt.transforms.kronecker._factors.x_map_factors__mutmut_34": (
    "the ordering zero subtracted instead of added: x - 0 equals x + 0 (up to the sign of "
    "a zero entry, which compares equal)"
  ),
  "curvopt.transforms.kronecker._factors.x_map_factors__mutmut_13": (
    "the default key read from a square factor's other axis"
  ),
  "curvopt.transforms.kronecker._factors.x_factor_statistics__mutmut_34": (
    "the einsum's subscripts in upper case: the same contraction"
  ),
  "curvopt.transforms.kronecker._factors.x_mode_product__mutmut_8": (
    "zip's strict=None: the axes and matrices always have equal lengths"
  ),
  "curvopt.transforms.kronecker._factors.x_mode_product__mutmut_11": (
    "zip's strict dropped: as mutant 8"
  ),
  "curvopt.transforms.kronecker._factors.x_mode_product__mutmut_12": (
    "zip's strict=False: as mutant 8"
  ),
  "curvopt.transforms.kronecker._factors.x_unpack_symmetric__mutmut_11": (
    "isqrt(8 s + 2) instead of isqrt(8 s + 1): for a triangle's size s, 8 s + 1 = (2 d + 1)^2 "
    "and 8 s + 2 is below (2 d + 2)^2, so the root is the same; other sizes fail the check "
    "either way"
  ),
  "curvopt.transforms.kronecker._factors.x_unpack_symmetric__mutmut_14": (
    "the check's true division: d (d + 1) is even, so d (d + 1) / 2 is exact"
  ),
  "curvopt.transforms.kronecker._factors.x_unpack_symmetric__mutmut_38": (
    "the transposed triangle with its diagonal: the maximum of two equal diagonals"
  ),
  "curvopt.estimators._slq.x\u01c1SpectralDensity\u01c1moment__mutmut_8": (
    "the sum over axis 1 instead of -1: the same axis of the documented (probes, m) arrays"
  ),
  "curvopt.estimators._slq.x\u01c1SpectralDensity\u01c1trace__mutmut_13": (
    "the sum over axis 1 instead of -1: as moment's mutant 8"
  ),
  "curvopt.transforms.kronecker._factors.x__distributed__mutmut_3": (
    "the identities' size read from axis 1 of a stack of square factors: the same"
  ),
  "curvopt.transforms.kronecker._factors.x__distributed__mutmut_4": (
    "the identities' size read from a square factor's other axis"
  ),
  "curvopt.transforms.kronecker._factors.x__one_at_a_time__mutmut_11": (
    "entry 1 of a length-1 axis instead of entry 0: JAX clamps a static index, the same entry"
  ),
  "curvopt.estimators._slq.x_spectral_density__mutmut_40": (
    "the Rademacher start drawn in each leaf's dtype: entries of +-1 are exact in every dtype"
  ),
  "curvopt.estimators._slq.x_spectral_density__mutmut_44": ("as mutant 40"),
  "curvopt.estimators._slq.x_spectral_density__mutmut_75": (
    "the weight of an invalid Ritz value: SLQ runs every step (no stopping rule), so every "
    "Ritz value of its tridiagonal matrix is valid"
  ),
  "curvopt.estimators._slq.x\u01c1SpectralDensity\u01c1density__mutmut_29": (
    "the mean over axis 1 instead of -1 of a (grid, probes) array: the same axis"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_105": (
    "the loop's first 'change' (inf) in the default float type: jnp.asarray of a Python "
    "float is weakly typed, and lax loops give a weak carry the body's dtype; inf in any type"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_107": (
    "the loop's first 'change' with its dtype argument dropped: as mutant 105"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_125": (
    "the final product cast to dtype None (no cast): as mutant 69"
  ),
  "curvopt.transforms.kronecker._grafting.x_grafting_transform__mutmut_24": (
    "eps_in_sqrt=None instead of False: optax reads it as a truth value"
  ),
  "curvopt.estimators._power.x_power_iteration__mutmut_69": (
    "the product cast to dtype None, which optax.tree.cast reads as no cast: the bfloat16 "
    "leaves a product may hold promote exactly to the working dtype in every use (the dot, "
    "the normalization)"
  ),
  "curvopt.estimators._power.x__normalized__mutmut_10": (
    "a zero norm divided by itself: the NaN sits in the branch the outer where discards"
  ),
  "curvopt.transforms._safety.x_all_finite__mutmut_17": (
    "the one vector left in its leaves' promoted dtype instead of float32: each entry is "
    "finite exactly where it was"
  ),
  "curvopt.transforms._safety.x__exactly_castable__mutmut_5": (
    "real - imag of x * 0 instead of real + imag: each part is 0 or NaN, so is the sum, "
    "so is the difference"
  ),
  "curvopt.transforms._safety.x__exactly_castable__mutmut_6": (
    "a float32-or-narrower leaf read as x * 0 too: finite exactly where x is"
  ),
  "curvopt.transforms._safety.x__exactly_castable__mutmut_8": (
    "jnp.finfo(None) is float64's (64 bits): every real leaf read as x * 0, finite exactly "
    "where x is"
  ),
  "curvopt.transforms._safety.x__exactly_castable__mutmut_9": (
    "float32 leaves read as x * 0 (bits < 32): finite exactly where x is"
  ),
  "curvopt.transforms._safety.x__exactly_castable__mutmut_10": (
    "bits <= 33: no floating-point type has 33 bits"
  ),
  "curvopt.estimators._fisher_inverse.x_factor__mutmut_2": (
    "the identity sized by the kernel's second axis: the kernel is square"
  ),
  "curvopt.estimators._fisher_inverse.x_shifted_inverse__mutmut_6": (
    "the identity sized by the kernel's second axis: the kernel is square"
  ),
  "curvopt.transforms._masking.x_refuse_masked_view__mutmut_5": (
    "getattr's default None instead of False: both read as false"
  ),
  "curvopt.estimators._fisher_inverse.x__flat_rows__mutmut_32": (
    "the unravel function read from the second stacked gradient instead of the first: "
    "every one has the same structure, and out-of-range indexing clamps in JAX"
  ),
}
# Boundary mutants of a comparison between two rounded floats: they differ only on an
# exact tie, which no input can be made to hit on purpose.
EQUIVALENT.update(
  {
    f"curvopt._matrix_roots.x__newton_root__mutmut_{n}": "tie-only: > vs >= or < vs <="
    for n in (42, 43, 88)
  }
)
# The other axis of a square matrix (matrix_inverse_root refuses any other).
EQUIVALENT.update(
  {
    f"curvopt._matrix_roots.x_{name}": "shape[1] of a square matrix"
    for name in (
      "_largest_eigenvalue__mutmut_25",
      "_largest_eigenvalue__mutmut_27",
      "_newton_root__mutmut_2",
    )
  }
)
# estimate_sharpness passes lanczos_eigenpairs' own defaults explicitly (k=1 and
# which="LA"): dropping one changes nothing; and it reads entry 0 of length-1 arrays,
# where JAX clamps an index of 1 back to entry 0.
EQUIVALENT.update(
  {
    f"curvopt.estimators._sharpness.x_estimate_sharpness__mutmut_{n}": reason
    for n, reason in (
      (16, "k=1 dropped: lanczos_eigenpairs' default"),
      (17, 'which="LA" dropped: lanczos_eigenpairs\' default'),
      (37, "eigenvalues[1] of a length-1 array: JAX clamps the index to 0"),
      (38, "residuals[1] of a length-1 array: JAX clamps the index to 0"),
      (39, "converged[1] of a length-1 array: JAX clamps the index to 0"),
      (45, "eigenvectors' row 1 of a one-row basis: JAX clamps the index to 0"),
    )
  }
)
# The cubic subproblem, checked by a scan (13,896 subproblems under jit and vmap, float32
# and float64: g_0 = 10^-k for k <= 45 on convex, singular, indefinite and nearly
# degenerate spectra, and 6,000 random ones) against the unmutated code: bit-identical
# steps, or (ties in the bisection's test, a wider bracket) steps that differ in the last
# bits with model values equal to rounding. An earlier scan, run eagerly, had called two
# moves of the bracket's low end equivalent; this one found them different in nearly
# degenerate float32 cases (one is now killed by a test) and found a real bug (the
# bracket's norm underflowed for tiny gradients).
EQUIVALENT.update(
  {
    f"curvopt._cubic_subproblem.x_{name}": reason
    for name, reason in (
      ("cubic_subproblem__mutmut_40", "lowest <= 0: at lambda_min = 0 both branches give h"),
      ("cubic_subproblem__mutmut_50", "tie-only: step norm < r_edge instead of <="),
      ("_easy_case__mutmut_15", "tie-only in the bisection: the last bits of r, same model value"),
      ("_easy_case__mutmut_33", "a wider bracket (3 |g| / M): the same root to the last bits"),
      ("_easy_case__mutmut_44", "99 halvings instead of 100: r resolved to its last bit by 60"),
      ("_easy_case__mutmut_69", "the divisor where g == 0 is masked by the outer where"),
      ("_hard_case__mutmut_8", "tie-only: a gap exactly at 8 eps max|lambda|"),
      (
        "_hard_case__mutmut_29",
        "the divisor in the lowest eigenspace is masked by the outer where",
      ),
      # The scaled norm's guard matters only for g == 0, whose easy-case step is zeroed by
      # `where(g == 0)` and whose hard case reads no norm.
      ("_scaled_norm__mutmut_13", "scale >= 0: 0/0 in the bracket of an all-zero g only"),
      ("_scaled_norm__mutmut_15", "divisor 2 for scale == 0: 0 / 2 is 0 / 1"),
    )
  }
)
# Matrix-product precision on CPU: XLA:CPU computes every precision at the operands' full
# width, so HIGHEST, DEFAULT and None agree there (the argument matters on GPU and TPU).
EQUIVALENT.update(
  {
    f"curvopt._tree.x_{name}": "precision HIGHEST -> default: identical on CPU"
    for name in (
      "dot__mutmut_9",
      "dot__mutmut_12",
      "dot__mutmut_18",
      "dot__mutmut_21",
      "stacked_dot__mutmut_5",
      "stacked_dot__mutmut_9",
      "stacked_combine__mutmut_9",
      "stacked_combine__mutmut_13",
    )
  }
)
EQUIVALENT.update(
  {
    "curvopt._tree.x_is_key__mutmut_7": (
      "getattr's default None: jnp.issubdtype(None, prng_key) is False, as for float32"
    ),
    "curvopt._tree.x_working_dtype__mutmut_6": (
      "jnp.dtype(None) is the default float, float64 whenever a float64 leaf exists (x64 on)"
    ),
    "curvopt._tree.x_stacked_get__mutmut_9": "keepdims=None instead of False: both false",
    **{
      f"curvopt._tree.x_dot__mutmut_{n}": (
        "zip's strict check loosened: dot compares the leaf counts itself first"
      )
      for n in (24, 27, 28)
    },
    "curvopt._tree.x_stacked_get__mutmut_12": "axis 0 dropped: dynamic_index_in_dim's default",
    "curvopt._tree.x_orthogonalize__mutmut_15": "tie-only: < vs <= between two rounded norms",
    "curvopt._tree.x_own_buffers__mutmut_2": (
      "a non-array or a tracer let through reaches addressable_shards, which raises for both "
      "and is caught: returned as it is"
    ),
  }
)
# Probes: +-1 is exact in every dtype, so where a sign's dtype is dropped the values are
# the same; the Gaussian draw is computed in float32 whatever the cast; the counter hash is
# elementwise in the word index, so asking for more words keeps the first ones.
EQUIVALENT.update(
  {
    f"curvopt.oracles._probes.x_{name}": reason
    for name, reason in (
      ("random_vector__mutmut_50", "counter draw with dtype None: exact signs, float32 normals"),
      ("random_vector__mutmut_59", "zip's strict loosened: sizes come from the same leaves"),
      ("random_vector__mutmut_62", "zip's strict dropped: sizes come from the same leaves"),
      ("random_vector__mutmut_63", "zip's strict off: sizes come from the same leaves"),
      ("_rademacher__mutmut_4", "signs drawn in the default dtype: +-1 exactly, cast later"),
      (
        "_signs__mutmut_7",
        "one word more when n is a multiple of 32: the counter hash and JAX's partitionable "
        "threefry (the default) give the same first words for any length",
      ),
      ("_signs__mutmut_10", "bit positions as default integers: the same bits"),
      ("_signs__mutmut_12", "bit positions as default integers: the same bits"),
      ("_signs__mutmut_15", "+-1 in the default dtype: exact, cast per leaf later"),
      ("_signs__mutmut_19", "bits in the default dtype: 2 b - 1 is exact"),
      ("_box_muller__mutmut_31", "the float32 normals cast to the default dtype, then per leaf"),
      ("counter_uniform__mutmut_8", "two words instead of one: the first is the same"),
      ("counter_uniform__mutmut_9", "index 1 of one word: JAX clamps it to 0"),
    )
  }
)
# Output losses: a batch size made an array without a dtype is a weakly typed integer, and
# its square root a weakly typed float that takes the outputs' dtype; the axis of a sum over
# a 2-D array's last axis is -1 or +1 alike; a logit column index of 1 clamps to 0.
EQUIVALENT.update(
  {
    f"curvopt.oracles._output_loss.x{name}": reason
    for name, reason in (
      ("ǁSquaredErrorǁ__call____mutmut_20", "axis=+1 of a 2-D array is axis=-1"),
      ("ǁSquaredErrorǁoutput_curvature__mutmut_7", "sqrt of a weakly typed batch size"),
      ("ǁSquaredErrorǁoutput_curvature__mutmut_9", "sqrt of a weakly typed batch size"),
      ("ǁSigmoidCrossEntropyǁ__call____mutmut_3", "column 1 of one column clamps to 0"),
      ("ǁSoftmaxCrossEntropyǁ_targets__mutmut_14", "shape[+1] of 2-D logits is shape[-1]"),
      ("__autodiff_curvature__mutmut_37", "blocks transposed: Hessian blocks are symmetric"),
      ("__autodiff_curvature__mutmut_38", "blocks transposed: Hessian blocks are symmetric"),
      (
        "__autodiff_curvature__mutmut_49",
        "no symmetrization: jnp.linalg.eigh symmetrizes its input",
      ),
      (
        "__autodiff_curvature__mutmut_50",
        "no symmetrization: jnp.linalg.eigh symmetrizes its input",
      ),
      (
        "__autodiff_curvature__mutmut_51",
        "no symmetrization: jnp.linalg.eigh symmetrizes its input",
      ),
      ("__autodiff_curvature__mutmut_64", "tie-only: > vs >= at the round-off cut"),
      ("__autodiff_curvature__mutmut_73", "a dropped direction's placeholder root: never used"),
      ("__autodiff_curvature__mutmut_82", "einsum subscripts in capitals: the same contraction"),
      ("__autodiff_curvature__mutmut_109", "einsum subscripts in capitals: the same contraction"),
      ("ǁSoftmaxCrossEntropyǁ__call____mutmut_12", "axis=+1 of a 2-D array is axis=-1"),
      ("ǁSoftmaxCrossEntropyǁoutput_curvature__mutmut_15", "sqrt of a weakly typed batch size"),
      ("ǁSoftmaxCrossEntropyǁoutput_curvature__mutmut_17", "sqrt of a weakly typed batch size"),
      ("ǁSigmoidCrossEntropyǁoutput_curvature__mutmut_23", "sqrt of a weakly typed batch size"),
      ("ǁSigmoidCrossEntropyǁoutput_curvature__mutmut_25", "sqrt of a weakly typed batch size"),
    )
  }
)
EQUIVALENT.update(
  {
    f"curvopt.transforms.hessian_diagonal._hutchinson.x_{name}": reason
    for name, reason in (
      ("flax_averaging_axes__mutmut_2", "range(ndim - 2) is empty below three axes anyway"),
      ("spatial_average__mutmut_19", "a mean over no axes is the leaf itself"),
      ("spatial_average__mutmut_34", "zip's strict loosened: the axes come from the same tree"),
      ("spatial_average__mutmut_37", "zip's strict dropped: the axes come from the same tree"),
      ("spatial_average__mutmut_38", "zip's strict off: the axes come from the same tree"),
    )
  }
)
EQUIVALENT.update(
  {
    f"curvopt.transforms.hessian_diagonal._sophia.x_scale_by_sophia_h__mutmut_{n}": reason
    for n, reason in (
      (33, "the default estimator's init ignores the parameters (a key and a count)"),
      (87, "the default estimator ignores the incoming updates (it probes value_fn)"),
    )
  }
)
EQUIVALENT.update(
  {
    f"curvopt._checks.x_{name}": 'float("INF") is float("inf")'
    for name in ("non_negative_float__mutmut_11", "positive__mutmut_15")
  }
)
EQUIVALENT.update(
  {
    f"curvopt._checks.x_matches_structure__mutmut_{n}": (
      "zip's strict loosened: the tree structures were compared equal first"
    )
    for n in (14, 17, 19)
  }
)
EQUIVALENT["curvopt._checks.x__concrete_real__mutmut_26"] = (
  "a real array read through complex(): its imaginary part is 0 and the real part returned"
)
EQUIVALENT["curvopt._checks.x__concrete_real__mutmut_6"] = (
  "a schedule let past the callable test still returns None: it is no Real number"
)
EQUIVALENT.update(
  {
    f"curvopt._jaxpr.x__equation_flops__mutmut_{n}": (
      "getattr's default for an output's shape: every traced output has one"
    )
    for n in (38, 41)
  }
)
# zip(..., strict=True) loosened in the guard's restart: the state's leaves, their key
# flags and init's leaves come from one tree, so the lengths agree.
EQUIVALENT.update(
  {
    f"curvopt.transforms._safety.x__restarted__mutmut_{n}": "zip's strict check dropped"
    for n in (8, 11, 12, 16, 19, 21, 52, 55, 56)
  }
)

EQUIVALENT["curvopt.transforms.psgd._dense.x_scale_by_psgd_dense__mutmut_43"] = (
  "kron_family(None, ..., flatten=True): the flattened form reads the tree only to key its "
  "one group (one vector, one dense factor); the factor is built from the array init is given"
)

# A called ClosedJaxpr evaluated as it is instead of its `.jaxpr`: it forwards constvars,
# invars, eqns and outvars to that jaxpr, and its consts are passed apart.
EQUIVALENT.update(
  {
    f"curvopt._xla_cpu.x__apply__mutmut_{n}": "a ClosedJaxpr reads as the jaxpr it closes"
    for n in (25, 31, 32)
  }
)

# The named Newton-CG spells out Martens' rule where it is levenberg_marquardt's default too.
EQUIVALENT.update(
  {
    f"curvopt.alias._newton_cg.x_newton_cg__mutmut_{n}": reason
    for n, reason in (
      (42, 'float("INF") is float("inf")'),
      (94, "increase=1.5 dropped: levenberg_marquardt's default is 1.5"),
      (96, "low=0.25 dropped: levenberg_marquardt's default is 0.25"),
      (97, "high=0.75 dropped: levenberg_marquardt's default is 0.75"),
    )
  }
)

# zip(..., strict=True) loosened in the jaxpr evaluator: a jaxpr's constants and inputs are
# made for its constvars and invars, an equation's outputs for its outvars (jax's invariant).
EQUIVALENT.update(
  {
    f"curvopt._xla_cpu.x__evaluate__mutmut_{n}": "zip's strict check dropped"
    for n in (7, 10, 11, 15, 18, 19, 29, 32, 35)
  }
)

EQUIVALENT.update(
  {
    f"curvopt.transforms.gauss_newton._line_search.x_scale_by_armijo_backtracking__mutmut_{n}": (
      reason
    )
    for n, reason in (
      (55, 'float("INF") is float("inf")'),
      (159, "the trial counter in the default type: it counts to max_steps and never leaves"),
      (161, "the trial counter in the default type: it counts to max_steps and never leaves"),
      (186, "int32 + bool is int32: the cast to int32 was already the promotion"),
      # The working dtype is the widest parameter dtype, so gradients are never wider and
      # promotion with the other operand (cast to it) gives the same product; only an
      # update wider than its parameter, which no curvopt transform produces, would differ.
      (100, "gradient not cast: the update operand is in the working dtype, promotion agrees"),
      (104, "update not cast: promotion with the gradient gives the working dtype"),
      (180, "update not cast before the product: applied is in the working dtype already"),
    )
  }
)

EQUIVALENT.update(
  {
    f"curvopt.oracles._gauss_newton_factor.xǁGaussNewtonFactorǁ{name}": reason
    for name, reason in (
      *(
        (n, "precision HIGHEST -> default: identical on CPU")
        for n in ("gradient__mutmut_6", "gradient__mutmut_10", "mv__mutmut_8")
      ),
      *(
        (n, "precision HIGHEST -> default: identical on CPU")
        for n in ("mv__mutmut_12", "rmv__mutmut_5", "rmv__mutmut_9")
      ),
      *(
        (n, "einsum subscripts in capitals: the same contraction under other letters")
        for n in ("gradient__mutmut_12", "mv__mutmut_14", "rmv__mutmut_11")
      ),
      ("as_matrix__mutmut_5", "d = b k: JVPs and VJPs build the same matrix at the same cost"),
    )
  }
)

EQUIVALENT.update(
  {
    f"curvopt.transforms.gauss_newton._levenberg_marquardt.x_levenberg_marquardt__mutmut_{n}": (
      reason
    )
    for n, reason in (
      (32, 'float("INF") is float("inf")'),
      (181, "tie-only: predicted >= 1e-16 instead of > 1e-16"),
      (215, "tie-only: a gain ratio exactly at low"),
      (222, "tie-only: a gain ratio exactly at high"),
      (280, "int32 + bool is int32: the cast to int32 was already the promotion"),
      # The model is evaluated on parameters and a step cast to the damping's dtype, so its
      # values (and the ratio of them) are in that dtype already for a loss that keeps its
      # input's dtype; gain_ratio is cast to it again when stored.
      (165, "the predicted decrease is in the damping's dtype already"),
      (175, "the gain ratio is in the damping's dtype already, and cast again when stored"),
    )
  }
)

EQUIVALENT.update(
  {
    f"curvopt.transforms.gauss_newton._newton_cg.x_{name}": reason
    for name, reason in (
      *(
        (f"_truncated_cg__mutmut_{n}", "the snapshot slot table's integer type (an index)")
        for n in (6, 9, 17, 19)
      ),
      ("_truncated_cg__mutmut_11", "one more slot-table entry, past the last CG iteration"),
      ("_truncated_cg__mutmut_13", "no-slot marker -2 instead of -1: the test is slot >= 0"),
      ("_truncated_cg__mutmut_140", "the snapshot at the exit iteration is the final iterate"),
      ("snapshot_iterations__mutmut_10", "ceil(1.3^64) = 1.9e7 CG iterations: never reached"),
      ("scale_by_newton_cg__mutmut_30", 'float("INF") is float("inf")'),
      ("scale_by_newton_cg__mutmut_153", "bfloat16 parameters plus a float32 step: promoted"),
      ("scale_by_newton_cg__mutmut_160", "a bfloat16 product plus the float32 damping term"),
    )
  }
)

EQUIVALENT.update(
  {
    f"curvopt.oracles._dataset.x_dataset_operator__mutmut_{n}": reason
    for n, reason in (
      (44, "zeros in the parameters' dtype: the first working-dtype term promotes them exactly"),
      (46, "zeros in the parameters' dtype: the first working-dtype term promotes them exactly"),
      (49, "zip's strict loosened: the sizes come from the same batches"),
      (52, "zip's strict dropped: the sizes come from the same batches"),
      (53, "zip's strict off: the sizes come from the same batches"),
    )
  }
)


def _workspace_of(module: str) -> pathlib.Path:
  return (
    pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "curvopt-mutation" / module.replace("/", ".")
  )


def _tracked(paths: list[str]) -> list[str]:
  """The repository's tracked files under `paths`."""
  return subprocess.run(
    ["git", "ls-files", *paths], cwd=REPO, check=True, capture_output=True, text=True
  ).stdout.split()


def _code(source: str) -> str:
  """The program in `source` without its comments and docstrings (what mutmut mutates)."""
  tree = ast.parse(source)
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if (
      isinstance(body, list)
      and body
      and isinstance(body[0], ast.Expr)
      and isinstance(body[0].value, ast.Constant)
      and isinstance(body[0].value.value, str)
    ):
      node.body = body[1:] or [ast.Pass()]
  return ast.dump(tree)


def _stale(module: str, root: pathlib.Path) -> bool:
  """Whether `module`'s code changed since the pass in `root` (which keeps an unmutated copy)."""
  copy = root / module
  if not copy.exists():
    return True
  return _code(copy.read_text()) != _code((REPO / module).read_text())


def _copy_tracked(paths: list[str], *destinations: pathlib.Path) -> None:
  """The repository's tracked files under `paths`, copied into each destination."""
  tracked = _tracked(paths)
  for root in destinations:
    for name in tracked:
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / name, root / name)


def _configure(module: str, *roots: pathlib.Path) -> None:
  """Each root's pyproject.toml: the repository's, plus today's mutmut section for `module`."""
  tests, select = MODULES[module]
  settings = {
    "source_paths": ["curvopt"],
    "only_mutate": [module],
    "pytest_add_cli_args_test_selection": tests,
    # Forked straight from a process that ran JAX, a worker hangs (XLA's thread pools do
    # not survive fork): each worker starts from a bare fork server and imports JAX itself.
    "process_isolation": "forkserver",
    "forkserver_warmup": "none",
    "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", *(["-k", select] if select else [])],
  }
  section = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
  text = (REPO / "pyproject.toml").read_text() + "\n".join(section) + "\n"
  for root in roots:
    (root / "pyproject.toml").write_text(text)


def _workspace(module: str) -> pathlib.Path:
  root = _workspace_of(module)
  if root.exists():
    shutil.rmtree(root)
  root.mkdir(parents=True)
  _copy_tracked(["curvopt", "tests", "README.md"], root)
  _configure(module, root)
  return root


def _status(root: pathlib.Path) -> dict[str, str]:
  mutmut = pathlib.Path(sys.executable).with_name("mutmut")
  listing = subprocess.run(
    [str(mutmut), "results", "--all", "true"],
    cwd=root,
    check=False,
    capture_output=True,
    text=True,
  ).stdout
  return dict(re.findall(r"^\s*(\S+): (\S.*)$", listing, flags=re.MULTILINE))


def report(module: str, root: pathlib.Path, seconds: float) -> dict:
  """The pass's counts from its workspace (survivors listed, known equivalents left out)."""
  tests, select = MODULES[module]
  status = _status(root)
  survived = sorted(n for n, s in status.items() if s == "survived" and n not in EQUIVALENT)
  counted = {n: s for n, s in status.items() if n not in EQUIVALENT}
  # A mutant on which the tests hang (mutmut's timeout) does not pass them: caught.
  killed = sum(s in ("killed", "timeout") for s in counted.values())
  return {
    "module": module,
    "tests": tests,
    "select": select,
    "mutants": len(status),
    "equivalent": len(status) - len(counted),
    "killed": killed,
    "survived": survived,
    "other": sorted(
      f"{n}: {s}" for n, s in counted.items() if s not in ("killed", "timeout", "survived")
    ),
    "score": killed / len(counted) if counted else float("nan"),
    "seconds": seconds,
    "workspace": str(root),
    # The module changed since this pass: its score is for the old code.
    "stale": _stale(module, root),
  }


def run_module(module: str, max_children: int, rerun: bool = False) -> dict:
  """Mutates `module` and runs its tests; `rerun`: only the last pass's survivors, today's tests."""
  names = []
  if rerun:  # tests or selections changed since the pass: bring both in, rerun its survivors
    root = _workspace_of(module)
    if _stale(module, root):
      raise SystemExit(
        f"{module} changed since its pass in {root}: its mutants are numbered from the old "
        "code, so only a full pass (without --rerun) measures it."
      )
    # The other modules may have changed (a fix the tests now expect): bring them in too,
    # leaving the mutated copy of `module` in place.
    _copy_tracked(["curvopt"], root)
    _copy_tracked([p for p in _tracked(["curvopt"]) if p != module], root / "mutants")
    _copy_tracked(["tests"], root, root / "mutants")
    _configure(module, root, root / "mutants")
    # "no tests": no test called the function when the stats were taken; new ones may.
    names = [n for n, s in _status(root).items() if s in ("survived", "no tests")]
    # mutmut maps each function to the tests that called it when its stats were taken, and
    # retakes them only for new test names: a test extended since then would not be run.
    (root / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
  else:
    root = _workspace(module)
  mutmut = pathlib.Path(sys.executable).with_name("mutmut")
  started = time.perf_counter()
  # Every mutant's tests compile the same programs but the mutated one's: a persistent
  # compilation cache kept with the workspace (read by tests/conftest.py) compiles them
  # once (tests/test_mfac.py: 110 s cold, 35 s warm on a loaded machine).
  cache = root / "jax-cache"
  cache.mkdir(exist_ok=True)
  log = root / "mutmut.log"
  with log.open("w") as output:
    finished = subprocess.run(
      [str(mutmut), "run", "--max-children", str(max_children), *names],
      cwd=root,
      env={**os.environ, "CURVOPT_TEST_COMPILATION_CACHE": str(cache)},
      check=False,
      stdout=output,
      stderr=subprocess.STDOUT,
    )
  if finished.returncode != 0:
    # E.g. "failed to collect stats": a test fails on the unmutated code, and mutmut leaves
    # the last pass's statuses in place. Reporting them would be a stale score.
    tail = log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-5:]
    raise SystemExit(
      f"mutmut failed on {module} (exit {finished.returncode}); its statuses in {root} are "
      "not from this run. Last lines of " + str(log) + ":\n  " + "\n  ".join(tail)
    )
  return report(module, root, time.perf_counter() - started)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("modules", nargs="*", help="modules to mutate (paths in the repository)")
  parser.add_argument("--all", action="store_true", help="every module in MODULES")
  parser.add_argument("--max-children", type=int, default=2)
  parser.add_argument(
    "--report", action="store_true", help="only read each module's last pass from its workspace"
  )
  parser.add_argument(
    "--rerun",
    action="store_true",
    help="only the last pass's survivors and untested mutants, against today's tests",
  )
  parser.add_argument("--json", default=None, help="append each module's result to this file")
  parser.add_argument("--table", default=None, help="write the modules' results as markdown here")
  args = parser.parse_args()
  modules = list(MODULES) if args.all else args.modules
  unknown = [m for m in modules if m not in MODULES]
  if unknown or not modules:
    parser.error(f"modules must be among {sorted(MODULES)}; got {unknown or 'none'}")
  rows = []
  for module in modules:
    if args.report:
      result = report(module, _workspace_of(module), float("nan"))
    else:
      result = run_module(module, args.max_children, args.rerun)
    rows.append(result)
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(result) + "\n")
  if args.table:
    pathlib.Path(args.table).write_text(_table(rows))


def _table(rows: list[dict]) -> str:
  lines = [
    "| module | tests | mutants | equivalent | killed | survived | score |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    tests = ", ".join(f"`{t}`" for t in r["tests"])
    if r["select"]:
      tests += f" (`-k {r['select']}`)"
    lines.append(
      f"| `{r['module']}` | {tests} | {r['mutants']} | {r['equivalent']} | {r['killed']} "
      f"| {len(r['survived']) + len(r['other'])} | {100 * r['score']:.1f}%"
      f"{' (stale: the module changed since)' if r.get('stale') else ''} |"
    )
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
