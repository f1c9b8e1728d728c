"""The Kronecker methods' refreshes on this backend, each against its cheaper alternative.

SOAP's eigenbasis: `eigh` against one power-iteration step and a QR (Vyas et
al. 2025). Shampoo's inverse fourth root: `eigh` against the coupled Newton
iteration (Higham 2008, eq. 7.18; matrix products only). Per factor size `d`,
`n` stacked factors (as both methods stack a model's blocks), the median time
of the jitted refresh over repeated calls, the two methods interleaved. A
refresh's share of training is its time over the refresh period, beside the
step time the runner reports (`median_step_ms` leaves refreshes out,
`robust_step_ms` spreads them over their period).

Run:  python benchmarks/kronecker_refresh.py --out benchmarks/results/kronecker_refresh.md
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from curvopt import matrix_inverse_root
from curvopt.transforms.kronecker._soap import _eigenbases, _power_qr_bases


def _timed(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def _interleaved(first, second, args, repeats: int) -> tuple[float, float]:
  """Median milliseconds of each, over three interleaved rounds of `repeats` calls."""
  times: tuple[list, list] = ([], [])
  for _ in range(3):
    times[0].append(_timed(first, *args, repeats=repeats))
    times[1].append(_timed(second, *args, repeats=repeats))
  return tuple(1e3 * statistics.median(t) for t in times)


def _root(method: str):
  return jax.jit(jax.vmap(lambda a: matrix_inverse_root(a, 4, method=method).matrix))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="64,128,256,512")
  parser.add_argument("--factors", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  device = jax.devices()[0]
  lines = [
    "# Kronecker refreshes: eigh against the matrix-product alternatives",
    "",
    f"`python benchmarks/kronecker_refresh.py`; jax {jax.__version__}, {device.platform} "
    f"({device.device_kind}), {platform.machine()}; {args.factors} stacked factors per "
    f"size, median of {args.repeats} calls in 3 interleaved rounds, float32.",
    "",
    "| d | SOAP eigh (ms) | power + QR (ms) | ratio | Shampoo eigh root (ms) "
    "| coupled Newton root (ms) | ratio |",
    "|---:|---:|---:|---:|---:|---:|---:|",
  ]
  eigh_basis = jax.jit(lambda s, q: _eigenbases(s, q))
  power_basis = jax.jit(lambda s, q: _power_qr_bases(s, q))
  eigh_root, newton_root = _root("eigh"), _root("newton")
  for d in map(int, args.sizes.split(",")):
    x = jax.random.normal(jax.random.key(d), (args.factors, d, 2 * d))
    s = jnp.einsum("nij,nkj->nik", x, x) / (2 * d)
    q = jnp.broadcast_to(jnp.eye(d), (args.factors, d, d))
    basis = _interleaved(eigh_basis, power_basis, (((s,),), ((q,),)), args.repeats)
    root = _interleaved(eigh_root, newton_root, (s,), args.repeats)
    lines.append(
      f"| {d} | {basis[0]:.2f} | {basis[1]:.2f} | {basis[0] / basis[1]:.1f}x "
      f"| {root[0]:.2f} | {root[1]:.2f} | {root[0] / root[1]:.1f}x |"
    )
    print(lines[-1], flush=True)
  if args.out:
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
