# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Why learning rates transfer: sharpness across widths under muP and NTK
#
# **Claim** (Noci, Meterez, Hofmann, Orvieto 2024, "Super Consistency of
# Neural Network Landscapes and Learning Rate Transfer"): under muP, with
# muP's learning-rate scaling, the sharpness trajectory does not depend on
# the width: it reaches the edge of stability and holds it at every width,
# which is why one learning rate works for all widths. Under the NTK
# parameterization the model becomes lazier as it widens, progressive
# sharpening fades, and the curvature seen by the optimizer depends on the
# width.
#
# **Setup**: 512 standardized digits; bias-free MLP 64-N-N-10 tanh with
# `N(0, 1)` weights and multipliers `1/sqrt(fan_in)` (NTK), or the same with
# a `1/fan_in` readout (muP); the square loss; full-batch GD for 400 steps,
# `eta = 6` at every width under NTK and `eta = 6 N` under muP (muP's SGD
# learning-rate scaling in this multiplier form). Biases are left out: under
# muP a bias needs its own width-free learning rate. We report the
# normalized sharpness `eta * lambda_max` (the sharpness of the
# preconditioned Hessian `eta H`, whose stability threshold is 2 at every
# width; it is the quantity Noci et al. plot), by `curvopt.sharpness`.

# %%

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from _setup import fast_or_full, half_mse, init_mlp, mlp, record, save_figure

import curvopt
from curvopt.bench import data

digits = data.digits()
n = fast_or_full(256, 512)
x, y = jnp.asarray(digits.x_train[:n]), jnp.asarray(digits.y_train[:n])
widths = fast_or_full([32, 64, 128], [64, 256, 1024])
steps = fast_or_full(200, 400)
every = fast_or_full(20, 40)
base_eta = 6.0


def learning_rate(parameterization, width):
  return base_eta * width if parameterization == "mup" else base_eta


def run(parameterization, width):
  eta = learning_rate(parameterization, width)
  params = init_mlp(jax.random.key(0), (64, width, width, 10), parameterization, bias=False)
  loss_fn = lambda p: half_mse(mlp(p, x, parameterization), y)

  @jax.jit
  def block(p):
    def step(p, _):
      value, grad = jax.value_and_grad(loss_fn)(p)
      return jax.tree.map(lambda w, g: w - eta * g, p, grad), value

    return jax.lax.scan(step, p, None, length=every)

  sharpness = jax.jit(lambda p, k: curvopt.sharpness(loss_fn, p, key=k, num_iterations=15))
  trace, losses = [], []
  for i in range(steps // every):
    trace.append(eta * float(sharpness(params, jax.random.key(i))))
    params, block_losses = block(params)
    losses.extend(np.asarray(block_losses).tolist())
  trace.append(eta * float(sharpness(params, jax.random.key(steps))))
  return np.array(trace), np.array(losses)


runs = {(pz, w): run(pz, w) for pz in ("mup", "ntk") for w in widths}

# %% [markdown]
# ## Late-phase sharpness across widths
#
# "Late phase": the last quarter of the run. The ratio of the largest to the
# smallest width's mean late normalized sharpness measures width dependence.

# %%
late = {}
for (pz, w), (trace, _) in runs.items():
  late.setdefault(pz, {})[w] = float(trace[-max(2, len(trace) // 4) :].mean())
ratios = {pz: max(v.values()) / min(v.values()) for pz, v in late.items()}
for pz in late:
  print(pz, {w: round(s, 3) for w, s in late[pz].items()}, "max/min", round(ratios[pz], 3))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, pz in zip(axes, ("mup", "ntk"), strict=True):
  for w in widths:
    trace, _ = runs[(pz, w)]
    ax.plot(np.arange(len(trace)) * every, trace, label=f"N={w}")
  ax.axhline(2.0, color="k", linestyle="--", linewidth=0.8)
  ax.set(title=pz.upper(), xlabel="step")
axes[0].set_ylabel("eta * sharpness (dashed: 2)")
axes[0].legend()
save_figure(fig, "03_mup_sharpness")

# %% [markdown]
# ## What we measured
#
# Full mode (`figures/03_mup_sharpness.json`): under muP the normalized
# sharpness over the last quarter of training is **2.012 / 2.024 / 2.017**
# at widths 64 / 256 / 1024, a max/min ratio of **1.006** (the issue asks
# for under 1.1): every width sits at the edge of stability. Under NTK it
# is **0.837 / 0.619 / 0.538**, a ratio of **1.55**, falling with width:
# the wider network barely sharpens. This is the paper's picture. One
# difference: our muP runs overshoot early (a catapult above 2) before
# settling; the paper's smoother curves come from larger models.

# %%
record(
  "03_mup_sharpness",
  {
    "widths": widths,
    "late_normalized_sharpness": {pz: {str(w): s for w, s in v.items()} for pz, v in late.items()},
    "max_over_min": ratios,
  },
)
