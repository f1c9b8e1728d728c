"""Real data sets that load offline: shipped with curvopt, scikit-learn's bundled ones, mnist1d."""

from __future__ import annotations

import functools
import gzip
import pathlib
from typing import NamedTuple

import numpy as np

# Data files that ship inside the package (provenance in its README.md).
SHIPPED = pathlib.Path(__file__).parent / "shipped"


class Dataset(NamedTuple):
  """A classification or regression data set as float32/int32 numpy arrays."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Dataset:
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = round(test_fraction * len(x))
  test, train = order[:n_test], order[n_test:]
  return Dataset(x[train], y[train], x[test], y[test])


def _standardize(data: Dataset) -> Dataset:
  mean = data.x_train.mean(axis=0)
  std = data.x_train.std(axis=0) + 1e-6
  return data._replace(
    x_train=((data.x_train - mean) / std).astype(np.float32),
    x_test=((data.x_test - mean) / std).astype(np.float32),
  )


@functools.cache
def digits(*, standardize: bool = True, seed: int = 0) -> Dataset:
  """The UCI 8x8 digits: 1797 x 64 features, 10 classes (20% held out).

  Read from the copy shipped with curvopt (scikit-learn's `digits.csv.gz`,
  unchanged), so the vision workloads need no data package: the accelerator
  image has none.
  """
  with gzip.open(SHIPPED / "digits.csv.gz", "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.float64)
  x = (table[:, :-1] / 16.0).astype(np.float32)
  data = _split(x, table[:, -1].astype(np.int32), 0.2, seed)
  return _standardize(data) if standardize else data


@functools.cache
def mnist1d(*, seed: int = 42) -> Dataset:
  """mnist1d, generated locally (4000 train, 1000 test, 40 features, 10 classes)."""
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.seed = seed
  raw = make_dataset(args)
  data = Dataset(
    raw["x"].astype(np.float32),
    raw["y"].astype(np.int32),
    raw["x_test"].astype(np.float32),
    raw["y_test"].astype(np.int32),
  )
  return _standardize(data)


@functools.cache
def breast_cancer(*, seed: int = 0) -> Dataset:
  """scikit-learn's breast cancer: 569 x 30 features, binary labels (20% held out)."""
  from sklearn.datasets import load_breast_cancer

  bunch = load_breast_cancer()
  return _standardize(
    _split(bunch.data.astype(np.float32), bunch.target.astype(np.int32), 0.2, seed)
  )


@functools.cache
def diabetes(*, seed: int = 0) -> Dataset:
  """scikit-learn's diabetes regression: 442 x 10 features; targets standardized (20% held out)."""
  from sklearn.datasets import load_diabetes

  bunch = load_diabetes()
  data = _standardize(
    _split(bunch.data.astype(np.float32), bunch.target.astype(np.float32), 0.2, seed)
  )
  mean, std = data.y_train.mean(), data.y_train.std()
  return data._replace(
    y_train=((data.y_train - mean) / std)[:, None].astype(np.float32),
    y_test=((data.y_test - mean) / std)[:, None].astype(np.float32),
  )


@functools.cache
def macbeth() -> tuple[np.ndarray, np.ndarray, str]:
  """Shakespeare's Macbeth as character ids: (train ids, test ids, vocabulary).

  The text ships with curvopt (public domain, 103 kB); the last 10% is held out.
  """
  path = SHIPPED / "macbeth.txt"
  text = path.read_text(encoding="utf-8")
  vocabulary = "".join(sorted(set(text)))
  ids = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  lookup = {ord(c): i for i, c in enumerate(vocabulary)}
  ids = np.array([lookup[int(c)] for c in ids], dtype=np.int32)
  split = int(0.9 * len(ids))
  return ids[:split], ids[split:], vocabulary


class TextCorpus(NamedTuple):
  """A byte-level corpus: token ids are the bytes (vocabulary 256)."""

  train: np.ndarray
  validation: np.ndarray
  description: str


# Directories of the standard library left out: the test suites (mostly data
# and fixtures) and IDLE.
_EXCLUDED_PARTS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages"})


@functools.cache
def python_source_corpus() -> TextCorpus:
  """The running Python's standard library source as a byte-level code corpus.

  Every `*.py` file under `sysconfig`'s stdlib directory, outside the test
  suites, IDLE and installed packages (CPython 3.11: 674 files, 11.4 MB),
  concatenated in sorted path order, each followed by a NUL byte. A file goes
  to validation when the CRC-32 of its relative path is 0 mod 20 (about 5%),
  so the split does not depend on which other files exist. The corpus
  differs between Python versions: the description names the version and a
  digest of the bytes, and results should be compared on the same one.
  """
  import hashlib
  import sys
  import sysconfig
  import zlib

  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(
    p for p in root.rglob("*.py") if not _EXCLUDED_PARTS & set(p.relative_to(root).parts)
  )
  train, validation = [], []
  for path in files:
    relative = path.relative_to(root).as_posix().encode()
    (validation if zlib.crc32(relative) % 20 == 0 else train).append(path.read_bytes() + b"\0")
  train_bytes, validation_bytes = b"".join(train), b"".join(validation)
  digest = hashlib.sha256(train_bytes + validation_bytes).hexdigest()[:10]
  version = ".".join(map(str, sys.version_info[:2]))
  return TextCorpus(
    np.frombuffer(train_bytes, np.uint8),
    np.frombuffer(validation_bytes, np.uint8),
    f"Python {version} stdlib source, {len(files)} files, "
    f"{len(train_bytes) / 1e6:.1f} MB train / {len(validation_bytes) / 1e6:.2f} MB validation, "
    f"sha256 {digest}",
  )
