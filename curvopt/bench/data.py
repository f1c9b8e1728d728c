"""Real data sets that load offline: scikit-learn's bundled ones and mnist1d."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


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
  """scikit-learn's 8x8 digits: 1797 x 64 features, 10 classes (20% held out)."""
  from sklearn.datasets import load_digits

  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  data = _split(x, bunch.target.astype(np.int32), 0.2, seed)
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
