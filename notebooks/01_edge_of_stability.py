# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Edge of stability
#
# **Claim** (Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021): under full-batch
# gradient descent with step size `eta`, the sharpness (the largest Hessian
# eigenvalue of the training loss) rises during training (progressive
# sharpening) until it reaches about `2/eta`, then hovers there while the loss
# keeps falling, non-monotonically. A small enough `eta` fits the data before
# the sharpness gets to `2/eta` (the negative control).
#
# **Setup** (the paper's `fc-tanh` with the square loss, shrunk to fit a CPU):
# 1000 standardized sklearn digits, MLP 64-200-200-10 tanh (LeCun init, 55k
# parameters), `0.5 mean ||f - onehot||^2`, full-batch GD for 3000 steps at
# `eta` = 0.1 and 0.09, and 0.05 as the control; the sharpness every 25 steps
# by `curvopt.sharpness` (20 Lanczos iterations on the full-batch Hessian).
# The fast mode (`CURVOPT_NOTEBOOK_FAST=1`) uses a 64-wide network on 300
# examples and larger steps.

# %%
import functools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from _setup import fast_or_full, half_mse, init_mlp, mlp, record, save_figure

import curvopt
from curvopt.bench import data

digits = data.digits()
n = fast_or_full(500, 1000)
width = fast_or_full(100, 200)
x, y = jnp.asarray(digits.x_train[:n]), jnp.asarray(digits.y_train[:n])
step_sizes = fast_or_full([0.15, 0.135], [0.1, 0.09])
control = fast_or_full(0.04, 0.05)
steps = fast_or_full(1500, 3000)
every = 25
loss_fn = lambda p: half_mse(mlp(p, x), y)
params0 = init_mlp(jax.random.key(0), (64, width, width, 10))


# %%
@functools.partial(jax.jit, static_argnums=1)
def gd_block(params, eta):
  """`every` full-batch GD steps in a `lax.scan` (no convolutions: no CPU loop trap)."""

  def step(p, _):
    value, grad = jax.value_and_grad(loss_fn)(p)
    return jax.tree.map(lambda w, g: w - eta * g, p, grad), value

  return jax.lax.scan(step, params, None, length=every)


sharpness = jax.jit(lambda p, key: curvopt.sharpness(loss_fn, p, key=key, num_iterations=20))


def train(eta):
  params, losses, sharp = params0, [], []
  for block in range(steps // every):
    sharp.append(float(sharpness(params, jax.random.key(block))))
    params, block_losses = gd_block(params, eta)
    losses.extend(np.asarray(block_losses).tolist())
  return np.array(losses), np.array(sharp)


runs = {eta: train(eta) for eta in [*step_sizes, control]}

# %% [markdown]
# ## Sharpness against `2/eta`
#
# For each run: the first step where the sharpness reaches 90% of `2/eta`,
# the mean and range of `sharpness * eta / 2` from 200 steps after that on,
# and how often the loss went up over a 25-step interval.

# %%
summary = {}
for eta, (losses, sharp) in runs.items():
  threshold = 2 / eta
  crossed = np.nonzero(sharp >= 0.9 * threshold)[0]
  row = {"initial_sharpness": float(sharp[0]), "max_sharpness": float(sharp.max())}
  if crossed.size:
    start = crossed[0] + 200 // every
    late = sharp[start:] / threshold
    row.update(
      crossing_step=int(crossed[0] * every),
      late_mean_ratio=float(late.mean()) if late.size else float("nan"),
      late_min_ratio=float(late.min()) if late.size else float("nan"),
      late_max_ratio=float(late.max()) if late.size else float("nan"),
    )
  block_ends = losses[every - 1 :: every]
  row["loss_up_fraction"] = float(np.mean(np.diff(block_ends) > 0))
  row["final_over_initial_loss"] = float(losses[-1] / losses[0])
  summary[f"eta={eta}"] = row
  print(f"eta={eta}: 2/eta={threshold:.1f}", row)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for eta, (losses, sharp) in runs.items():
  (line,) = axes[0].plot(np.arange(len(sharp)) * every, sharp, label=f"eta={eta}")
  axes[0].axhline(2 / eta, color=line.get_color(), linestyle="--", linewidth=0.8)
  axes[1].semilogy(losses, color=line.get_color(), label=f"eta={eta}")
axes[0].set(xlabel="step", ylabel="sharpness (dashed: 2/eta)", title="Sharpness")
axes[1].set(xlabel="step", ylabel="training loss", title="Loss")
axes[0].legend()
save_figure(fig, "01_edge_of_stability")

# %% [markdown]
# ## What we measured
#
# Full mode, 2 CPU cores (`figures/01_edge_of_stability.json`): the initial
# sharpness is 18.1. At `eta = 0.09` (`2/eta = 22.2`) it rises to 90% of
# `2/eta` by step 750 and from 200 steps later averages **1.003** times
# `2/eta` (range 0.95 to 1.04); at `eta = 0.1` (`2/eta = 20`) it starts
# within 10% of the threshold, goes to it at once and averages **0.991**
# times `2/eta` (range 0.81 to 1.06). Both are within the 10% the issue
# asks, and the loss rose in 13% and 26% of the 25-step intervals while
# falling to 0.6% of its initial value overall: the non-monotone descent
# the paper describes. The control at `eta = 0.05` sharpens to 23.9, far
# below `2/eta = 40`, and its loss falls monotonically. As in the paper
# with the square loss, the sharpness hovers at or just above `2/eta`; our
# initial sharpness is already close to the threshold at `eta = 0.1`, so
# that run shows the hovering more than the progressive sharpening.

# %%
record(
  "01_edge_of_stability",
  {
    "step_sizes": step_sizes,
    "control": control,
    **{k: v for k, v in summary.items()},
  },
)
