"""Linear operators over parameter pytrees, as values.

The vocabulary follows lineax (`mv`, `as_matrix`, `transpose`,
`in_structure`, `out_structure`, tags) on plain JAX pytrees, so an operator
costs nothing to build and composes with `jit`, `vmap` and `grad`. An
operator is itself a pytree: its leaves are the arrays its product closes
over (the parameters, the batch), so it can be passed into and returned from
a jitted function, or batched by `vmap`, as lineax's `FunctionLinearOperator`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from curvopt import _checks, _tree

SYMMETRIC = "symmetric"
POSITIVE_SEMIDEFINITE = "positive_semidefinite"

PyTree = Any


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class LinearOperator:
  """A square linear map on vectors shaped like a parameter pytree.

  Build operators inside the function you `jax.jit`: they close over the
  parameters and the batch, and are rebuilt for free at every trace. An
  operator is also a pytree whose leaves are the arrays its product closes
  over: flattening it traces the product once to a jaxpr (closure
  conversion), so it can cross a `jit` boundary or be `vmap`ped. Passing the
  same operator object again reuses that jaxpr; a new one retraces.

  Attributes:
    matvec: the raw product, a linear function from a vector pytree to one of
      the same structure. Prefer `mv`, which checks and casts its input.
    in_structure: a pytree of `jax.ShapeDtypeStruct`, one per parameter leaf.
    tags: unchecked promises about the operator, from `SYMMETRIC` and
      `POSITIVE_SEMIDEFINITE` (as in lineax).
    num_examples: how many data examples the curvature was measured on, when
      known; estimators report it beside their results, because mini-batch
      curvature is biased (Granziol et al. 2022).

  Examples:
    >>> import jax, jax.numpy as jnp, curvopt
    >>> op = curvopt.hessian(lambda w: jnp.sum(w**4) / 4, jnp.array([1.0, 2.0]))
    >>> op.mv(jnp.array([1.0, 1.0]))
    Array([ 3., 12.], dtype=float32)
  """

  matvec: Callable[[PyTree], PyTree]
  in_structure: PyTree
  tags: frozenset[str] = frozenset()
  num_examples: int | None = None

  @property
  def out_structure(self) -> PyTree:
    """Outputs have the structure of inputs: every operator here is square."""
    return self.in_structure

  @property
  def size(self) -> int:
    """The dimension `d` (total number of scalars in a vector)."""
    return _tree.size_of(self.in_structure)

  @property
  def dtype(self) -> jnp.dtype:
    """The dtype estimators work in: float64 if any leaf is, else float32."""
    return _tree.working_dtype(self.in_structure)

  def mv(self, vector: PyTree) -> PyTree:
    """The product `A v`.

    `vector` must have the structure and leaf shapes of `in_structure`; its
    leaves are cast to the operator's leaf dtypes (so float32 Krylov vectors
    work on bfloat16 parameters) and the result comes back in those dtypes.
    """
    _checks.matches_structure("vector", vector, self.in_structure)
    out = self.matvec(_tree.cast_like(vector, self.in_structure))
    return _tree.cast_like(out, self.out_structure)

  def __matmul__(self, vector: PyTree) -> PyTree:
    return self.mv(vector)

  def as_matrix(self) -> jax.Array:
    """The dense `d x d` matrix in the ravelled order of `jax.flatten_util`.

    For small problems and tests only: it costs `d` products. Compiled as one program
    (the operator is a pytree), so a call outside `jit` does not run, and compile, the
    batched product primitive by primitive.
    """
    return _dense_matrix(self)

  def tree_flatten(self) -> tuple[tuple, tuple]:
    program, consts = self._closure_converted
    leaves, treedef = jax.tree.flatten(self.in_structure)
    return tuple(consts), (program, tuple(leaves), treedef, self.tags, self.num_examples)

  @classmethod
  def tree_unflatten(cls, aux: tuple, consts: tuple) -> LinearOperator:
    program, leaves, treedef, tags, num_examples = aux
    operator = cls(
      functools.partial(_run_program, program, consts),
      jax.tree.unflatten(treedef, leaves),
      tags,
      num_examples,
    )
    object.__setattr__(operator, "_closure_converted", (program, consts))
    return operator

  @functools.cached_property
  def _closure_converted(self) -> tuple[_Program, list]:
    """The product as a jaxpr (static) and the arrays it closes over (the leaves)."""
    closed, out_shape = jax.make_jaxpr(self.matvec, return_shape=True)(
      _tree.zeros(self.in_structure)
    )
    program = _Program(closed.jaxpr, jax.tree.structure(out_shape))
    return program, list(closed.consts)

  def transpose(self) -> LinearOperator:
    """`A^T`: the operator itself when symmetric, else by `jax.linear_transpose`."""
    if SYMMETRIC in self.tags:
      return self
    transposed = jax.linear_transpose(self.matvec, _tree.zeros(self.in_structure))
    return LinearOperator(
      lambda v: transposed(v)[0], self.in_structure, self.tags, self.num_examples
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
  """A traced product: compared by identity, so one operator's flattenings share a jit cache."""

  jaxpr: Any
  out_tree: Any


def _run_program(program: _Program, consts: tuple, vector: PyTree) -> PyTree:
  closed = jax.extend.core.ClosedJaxpr(program.jaxpr, list(consts))
  outs = jax.extend.core.jaxpr_as_fun(closed)(*jax.tree.leaves(vector))
  return jax.tree.unflatten(program.out_tree, outs)


def is_symmetric(operator: LinearOperator) -> bool:
  """Whether `operator` is tagged symmetric.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.is_symmetric(curvopt.hessian(lambda w: jnp.sum(w**2), jnp.ones(2)))
    True
  """
  return SYMMETRIC in operator.tags


def is_positive_semidefinite(operator: LinearOperator) -> bool:
  """Whether `operator` is tagged positive semidefinite (an unchecked promise).

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.is_positive_semidefinite(curvopt.hessian(lambda w: jnp.sum(w**2), jnp.ones(2)))
    False
  """
  return POSITIVE_SEMIDEFINITE in operator.tags


def linear_operator(
  matvec: Callable[[PyTree], PyTree],
  like: PyTree,
  *,
  symmetric: bool = False,
  positive_semidefinite: bool = False,
  num_examples: int | None = None,
) -> LinearOperator:
  """Wraps a linear function on pytrees shaped like `like` as an operator.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> op = curvopt.linear_operator(lambda v: 2.0 * v, jnp.zeros(3), symmetric=True)
    >>> op.as_matrix()
    Array([[2., 0., 0.],
           [0., 2., 0.],
           [0., 0., 2.]], dtype=float32)
  """
  _checks.callable_arg("matvec", matvec)
  _checks.float_pytree("like", like)
  tags = set()
  if symmetric:
    tags.add(SYMMETRIC)
  if positive_semidefinite:
    tags.add(POSITIVE_SEMIDEFINITE)
  return LinearOperator(matvec, _tree.structure_of(like), frozenset(tags), num_examples)


def diagonal_operator(values: PyTree) -> LinearOperator:
  """The diagonal operator `diag(values)` on pytrees shaped like `values`.

  (lineax's `diagonal(op)` goes the other way: it extracts an operator's diagonal.)

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> curvopt.diagonal_operator(jnp.array([1.0, 3.0])).mv(jnp.array([2.0, 2.0]))
    Array([2., 6.], dtype=float32)
  """
  _checks.float_pytree("values", values)
  return LinearOperator(
    lambda v: jax.tree.map(jnp.multiply, values, v),
    _tree.structure_of(values),
    frozenset({SYMMETRIC}),
  )


def compose(*operators: LinearOperator) -> LinearOperator:
  """The product `A_1 A_2 ... A_n` (the last operator is applied first).

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> a = curvopt.diagonal_operator(jnp.array([2.0, 3.0]))
    >>> curvopt.compose(a, a).mv(jnp.ones(2))
    Array([4., 9.], dtype=float32)
  """
  if not operators:
    raise ValueError("compose needs at least one operator.")
  for i, op in enumerate(operators):
    if not isinstance(op, LinearOperator):
      raise TypeError(f"operators[{i}] must be a LinearOperator, got {type(op).__name__}.")
    _checks.matches_structure(
      f"operators[{i}].in_structure",
      op.in_structure,
      operators[0].in_structure,
      what="operators[0].in_structure",
    )

  def matvec(v: PyTree) -> PyTree:
    for op in reversed(operators):
      v = op.mv(v)
    return v

  num_examples = {op.num_examples for op in operators} - {None}
  return LinearOperator(
    matvec,
    operators[0].in_structure,
    frozenset(),
    num_examples.pop() if len(num_examples) == 1 else None,
  )


def preconditioned(operator: LinearOperator, preconditioner: PyTree) -> LinearOperator:
  """`P^{-1/2} A P^{-1/2}` for a diagonal preconditioner `P = diag(preconditioner)`.

  It has the eigenvalues of `P^{-1} A` and stays symmetric, so Lanczos applies:
  its top eigenvalue is the preconditioned sharpness that sets the stability
  limit of adaptive methods (Cohen et al. 2022, "Adaptive Gradient Methods at
  the Edge of Stability"). For Adam, pass `(sqrt(nu_hat) + eps) / learning_rate`.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> a = curvopt.diagonal_operator(jnp.array([4.0, 9.0]))
    >>> curvopt.preconditioned(a, jnp.array([4.0, 1.0])).mv(jnp.ones(2))
    Array([1., 9.], dtype=float32)
  """
  _checks.matches_structure(
    "preconditioner", preconditioner, operator.in_structure, what="the operator's input"
  )
  inv_sqrt = jax.tree.map(jax.lax.rsqrt, preconditioner)

  def matvec(v: PyTree) -> PyTree:
    scaled = jax.tree.map(jnp.multiply, inv_sqrt, v)
    return jax.tree.map(jnp.multiply, inv_sqrt, operator.mv(scaled))

  tags = operator.tags & {SYMMETRIC, POSITIVE_SEMIDEFINITE}
  return LinearOperator(matvec, operator.in_structure, tags, operator.num_examples)


def restrict(operator: LinearOperator, mask: PyTree | Callable[[Any, Any], bool]) -> LinearOperator:
  """The diagonal block of `operator` on the leaves where `mask` is True.

  The result acts on pytrees with the unselected leaves replaced by `None`:
  its dimension is the number of selected parameters, so per-layer traces
  and spectra (HAWQ-V2, Dong et al. 2020) come from the same estimators.

  Args:
    operator: the full operator.
    mask: a pytree of Python bools shaped like the parameters, or a function
      `(path, leaf_structure) -> bool` called on each leaf.

  Examples:
    >>> import jax.numpy as jnp, curvopt
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    >>> op = curvopt.hessian(lambda p: jnp.sum(p["w"] ** 2) * p["b"][0], params)
    >>> block = curvopt.restrict(op, {"w": True, "b": False})
    >>> block.as_matrix()
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(operator.in_structure)
  if callable(mask):
    selected = [bool(mask(path, spec)) for path, spec in leaves_with_paths]
  else:
    mask_def = jax.tree.structure(mask)
    if mask_def != treedef:
      raise ValueError(
        "mask must have the pytree structure of the parameters.\n"
        f"  expected: {treedef}\n  got:      {mask_def}"
      )
    selected = [bool(m) for m in jax.tree.leaves(mask)]
  if not any(selected):
    raise ValueError("mask selects no leaves; select at least one.")

  specs = [spec for _, spec in leaves_with_paths]
  sub_structure = treedef.unflatten(
    [s if keep else None for s, keep in zip(specs, selected, strict=True)]
  )

  def embed(sub: PyTree) -> PyTree:
    sub_leaves = iter(jax.tree.leaves(sub))
    return treedef.unflatten(
      [
        next(sub_leaves) if keep else jnp.zeros(s.shape, s.dtype)
        for s, keep in zip(specs, selected, strict=True)
      ]
    )

  def extract(full: PyTree) -> PyTree:
    full_leaves = jax.tree.leaves(full)
    return treedef.unflatten(
      [x if keep else None for x, keep in zip(full_leaves, selected, strict=True)]
    )

  tags = operator.tags & {SYMMETRIC, POSITIVE_SEMIDEFINITE}
  return LinearOperator(
    lambda v: extract(operator.mv(embed(v))), sub_structure, tags, operator.num_examples
  )


@jax.jit
def _dense_matrix(operator: LinearOperator) -> jax.Array:
  flat, unravel = ravel_pytree(_tree.zeros(operator.in_structure))
  eye = jnp.eye(flat.size, dtype=operator.dtype)
  as_column = lambda e: ravel_pytree(operator.mv(unravel(e)))[0].astype(operator.dtype)
  return jax.vmap(as_column)(eye).T
