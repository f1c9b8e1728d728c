"""SOAP's eigenbasis refresh: `eigh` against one power-iteration step and a QR.

Per factor size `d`, `n` stacked factors (as SOAP stacks a model's blocks), median
time of the jitted refresh over repeated calls, the two methods interleaved.

Run:  python benchmarks/soap_refresh.py --out benchmarks/results/soap_refresh.md
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from curvopt.transforms.kronecker._soap import _eigenbases, _power_qr_bases


def _timed(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="64,128,256,512")
  parser.add_argument("--factors", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  device = jax.devices()[0]
  lines = [
    "# SOAP eigenbasis refresh: eigh against power iteration + QR",
    "",
    f"`python benchmarks/soap_refresh.py`; jax {jax.__version__}, {device.platform} "
    f"({device.device_kind}), {platform.machine()}; {args.factors} stacked factors per "
    f"size, median of {args.repeats} calls, float32.",
    "",
    "| d | eigh (ms) | power + QR (ms) | eigh / power + QR |",
    "|---:|---:|---:|---:|",
  ]
  eigh = jax.jit(lambda s, q: _eigenbases(s, q))
  power = jax.jit(lambda s, q: _power_qr_bases(s, q))
  for d in map(int, args.sizes.split(",")):
    x = jax.random.normal(jax.random.key(d), (args.factors, d, 2 * d))
    s = jnp.einsum("nij,nkj->nik", x, x) / (2 * d)
    q = jnp.broadcast_to(jnp.eye(d), (args.factors, d, d))
    statistics_, bases = ((s,),), ((q,),)
    times = {"eigh": [], "power": []}
    for _ in range(3):  # interleaved rounds
      times["eigh"].append(_timed(eigh, statistics_, bases, repeats=args.repeats))
      times["power"].append(_timed(power, statistics_, bases, repeats=args.repeats))
    e, p = (1e3 * statistics.median(times[k]) for k in ("eigh", "power"))
    lines.append(f"| {d} | {e:.2f} | {p:.2f} | {e / p:.1f}x |")
    print(lines[-1], flush=True)
  if args.out:
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
