# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # The Hessian spectrum: density, mini-batch extremes, outliers
#
# **Claims** (three, one small model each):
#
# 1. **Stochastic Lanczos quadrature** (Ghorbani, Krishnan, Xiao, ICML 2019;
#    Lin, Saad, Yang 2016) recovers the spectral density of a network's
#    Hessian from a few Lanczos runs: its moments, its extreme eigenvalues
#    and its shape. Here, against the exact eigenvalues (`numpy.linalg.eigh`).
# 2. **Mini-batch extremes** (Granziol et al., JMLR 2022): a mini-batch
#    Hessian is the full one plus noise whose size falls with the batch size
#    `B`; its largest eigenvalue sits above the full Hessian's and
#    approaches it as `B` grows.
# 3. **A tiny subspace** (Gur-Ari, Roberts, Dyer 2018): after a short
#    initial phase the gradient lies mostly in the span of the top `k`
#    Hessian eigenvectors, `k` the number of classes, where the spectrum
#    has about `k` outliers. This needs the class structure of raw
#    (uncentred) inputs; with standardized inputs there are no outliers.

# %%
import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _setup import cross_entropy, fast_or_full, init_mlp, mlp, record, save_figure  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import curvopt  # noqa: E402
from curvopt.bench import data  # noqa: E402

f64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
numbers = {}

# %% [markdown]
# ## 1. SLQ density against exact eigenvalues
#
# MLP 64-16-10 tanh (1210 parameters) on standardized digits after 100
# gradient steps; SLQ with 80 Lanczos steps and 4 probes (fast: 40 and 2).

# %%
digits = data.digits()
x, y = f64(digits.x_train), jnp.asarray(digits.y_train)
small = f64(init_mlp(jax.random.key(0), (64, 16, 10)))
small_loss = lambda p: cross_entropy(mlp(p, x), y)


@jax.jit
def descend(p):
  step = lambda p, _: (jax.tree.map(lambda w, g: w - 0.5 * g, p, jax.grad(small_loss)(p)), None)
  return jax.lax.scan(step, p, None, length=100)[0]


small = descend(small)
flat, unravel = ravel_pytree(small)
exact = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda f: small_loss(unravel(f)))(flat)))
density = curvopt.spectral_density(
  curvopt.hessian(small_loss, small),
  jax.random.key(1),
  num_iterations=fast_or_full(40, 80),
  num_probes=fast_or_full(2, 4),
)
d = exact.size
slq = {
  "trace": float(density.trace()),
  "second_moment": float(density.moment(2)) * d,
  "largest_node": float(np.max(density.nodes)),
  "smallest_node": float(np.min(density.nodes)),
}
truth = {
  "trace": float(exact.sum()),
  "second_moment": float(np.sum(exact**2)),
  "largest_node": float(exact[-1]),
  "smallest_node": float(exact[0]),
}
numbers["slq"] = {k: {"slq": slq[k], "exact": truth[k]} for k in slq}
for k in slq:
  print(f"{k:15s} SLQ {slq[k]: .5f}   exact {truth[k]: .5f}")

grid = np.linspace(exact[0] - 0.05, exact[-1] + 0.05, 600)
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.hist(exact, bins=120, density=True, alpha=0.4, label="exact eigenvalues")
ax.semilogy(grid, density.density(grid, sigma=0.005), label="SLQ density")
ax.set(xlabel="eigenvalue", ylabel="density", ylim=(1e-3, None), title="Hessian spectrum")
ax.legend()
save_figure(fig, "02_slq_density")

# %% [markdown]
# ## 2. Mini-batch against full-batch top eigenvalue
#
# mnist1d (4000 examples), MLP 40-128-128-10 tanh, cross-entropy, 300 GD
# steps at 0.1; then the top eigenvalue (Lanczos) of `B`-example Hessians,
# 5 random batches per `B` (fast: 2 batches, width 64, 150 steps).

# %%
mnist = data.mnist1d()
xm, ym = f64(mnist.x_train), jnp.asarray(mnist.y_train)
width = fast_or_full(64, 128)
net = f64(init_mlp(jax.random.key(2), (40, width, width, 10)))
batch_loss = lambda p, idx: cross_entropy(mlp(p, xm[idx]), ym[idx])
full_loss = lambda p: cross_entropy(mlp(p, xm), ym)


@jax.jit
def warm_up(p):
  step = lambda p, _: (jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(full_loss)(p)), None)
  return jax.lax.scan(step, p, None, length=fast_or_full(150, 300))[0]


net = warm_up(net)
top = lambda loss: float(curvopt.sharpness(loss, net, key=jax.random.key(3), num_iterations=40))
full_top = top(full_loss)
batch_sizes = fast_or_full([16, 128, 1024], [8, 32, 128, 512, 2048])
rng = np.random.default_rng(0)
batch_top = {}
for b in batch_sizes:
  values = []
  for _ in range(fast_or_full(2, 5)):
    idx = jnp.asarray(rng.choice(len(ym), b, replace=False))
    values.append(top(lambda p, idx=idx: batch_loss(p, idx)))
  batch_top[b] = (float(np.mean(values)), float(np.std(values)))
  print(f"B={b:5d}: top eigenvalue {batch_top[b][0]:.3f} +- {batch_top[b][1]:.3f}")
print(f"full batch: {full_top:.3f}")
numbers["minibatch"] = {"full": full_top, **{str(b): v[0] for b, v in batch_top.items()}}

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.errorbar(
  batch_sizes,
  [batch_top[b][0] for b in batch_sizes],
  yerr=[batch_top[b][1] for b in batch_sizes],
  fmt="o-",
  label="mini-batch",
)
ax.axhline(full_top, color="k", linestyle="--", label="full data set")
ax.set(xscale="log", xlabel="batch size B", ylabel="top Hessian eigenvalue")
ax.legend()
save_figure(fig, "02_minibatch_top_eigenvalue")

# %% [markdown]
# ## 3. The gradient in the top-`k` eigenspace
#
# Raw digits (pixels / 16, not centred), MLP 64-64-64-10 tanh, SGD with
# batches of 128 at 0.1 for 2000 steps (fast: 400); at checkpoints the top
# 20 Hessian eigenpairs (Lanczos, 60 steps), the fraction
# `f_10 = ||P_10 g||^2 / ||g||^2` of the full-batch gradient in the top-10
# eigenspace (a random direction would give `10 / d = 0.0011`), and the
# overlap of consecutive top-10 eigenspaces `||V_t^T V_s||_F^2 / 10`.

# %%
raw = data.digits(standardize=False)
xr, yr = f64(raw.x_train), jnp.asarray(raw.y_train)
model = f64(init_mlp(jax.random.key(4), (64, 64, 64, 10)))
raw_loss = lambda p: cross_entropy(mlp(p, xr), yr)
sgd_loss = lambda p, idx: cross_entropy(mlp(p, xr[idx]), yr[idx])


@jax.jit
def sgd_steps(p, indices):
  step = lambda p, idx: (
    jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(sgd_loss)(p, idx)),
    None,
  )
  return jax.lax.scan(step, p, indices)[0]


def top_space(p):
  pairs = curvopt.lanczos_eigenpairs(
    curvopt.hessian(raw_loss, p), jax.random.key(5), k=20, num_iterations=60
  )
  vectors = jnp.concatenate(
    [leaf.reshape(20, -1) for leaf in jax.tree.leaves(pairs.eigenvectors)], axis=1
  )
  return np.asarray(pairs.eigenvalues), np.asarray(vectors)


checkpoints = fast_or_full([0, 50, 200, 400], [0, 50, 100, 200, 500, 1000, 2000])
rng = np.random.default_rng(1)
done, previous, subspace = 0, None, []
for step in checkpoints:
  if step > done:
    idx = rng.integers(0, len(yr), size=(step - done, 128))
    model = sgd_steps(model, jnp.asarray(idx))
    done = step
  values, vectors = top_space(model)
  g = np.asarray(ravel_pytree(jax.grad(raw_loss)(model))[0])
  fraction = float(np.sum((vectors[:10] @ g) ** 2) / np.sum(g**2))
  overlap = None if previous is None else float(np.sum((vectors[:10] @ previous.T) ** 2) / 10)
  previous = vectors[:10]
  subspace.append(
    {
      "step": step,
      "f10": fraction,
      "overlap": overlap,
      "gap_9_10": float(values[8] / values[9]),
      "gap_10_11": float(values[9] / values[10]),
    }
  )
  print(subspace[-1], "top eigenvalues", np.round(values[:12], 3))
numbers["tiny_subspace"] = subspace

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([s["step"] for s in subspace], [s["f10"] for s in subspace], "o-", label="f_10 (gradient)")
ax.plot(
  [s["step"] for s in subspace[1:]],
  [s["overlap"] for s in subspace[1:]],
  "s--",
  label="top-10 overlap with previous",
)
ax.set(xlabel="SGD step", ylim=(0, 1.05), title="Gradient in the top-10 Hessian eigenspace")
ax.legend()
save_figure(fig, "02_tiny_subspace")

# %% [markdown]
# ## What we measured
#
# Full mode (`figures/02_hessian_spectrum.json`):
#
# 1. SLQ with 4 probes of 80 steps: the extreme nodes equal the extreme
#    eigenvalues to 1e-14 (0.50151 and -0.13857; Lanczos converges first at
#    the edges of the spectrum); the trace is 18.74 against 18.36 (2%) and
#    the second moment 2.63 against 2.44 (8%): moments are Monte Carlo
#    estimates, with the error of 4 probes.
# 2. The mini-batch top eigenvalue is 9.19 / 5.18 / 3.94 / 3.67 / 3.57 for
#    `B` = 8 / 32 / 128 / 512 / 2048 against 3.55 for the full data set:
#    always above, the excess shrinking with `B`, as Granziol et al. predict.
# 3. On raw digits the gradient's fraction in the top-10 eigenspace goes
#    0.32 (init), 0.07, 0.18, 0.37 (step 200), 0.81 (step 500), 0.73, 0.68
#    (step 2000), against 10/d = 0.0011 for a random direction; the top-10
#    eigenspace barely moves after step 200 (overlap 0.89 to 0.98). The
#    spectrum has `C - 1 = 9` outliers at init (9th/10th eigenvalue ratio
#    1.58). This reproduces the claim in kind, less strongly than the
#    paper's figures (about 0.9) and than the anchor run (0.895 at step
#    2000): our fraction peaks at step 500 and then drifts down. With
#    standardized inputs the outliers and the effect disappear (see the
#    anchors): Gur-Ari et al.'s claim depends on the class structure.

# %%
record("02_hessian_spectrum", numbers)
