"""Any JAX function with its matmuls at a precision level, without touching its code.

`at_level(fn, level, backend)` traces `fn(params, x)` to a jaxpr and evaluates it
again with every `dot_general` replaced by the quantization seam's
(`precision.quantized_dot_general`): this is how a user's Flax block (linen or
NNX, `quee_jax.models.flax_adapter`) runs at every level of a ladder while its
module code stays as written.

Which side of a matmul is a weight is read off the data flow, not guessed from
names: a value computed from `params` alone (a kernel, a reshaped or cast
kernel) is a weight and gets the level's weight bits; anything that depends on
`x` is an activation and gets the activation bits, so attention's QK^T and AV,
wherever a library writes them (`jnp.einsum` inside
`flax.linen.dot_product_attention`), quantize both sides at the activation bits
and are tagged for the cost model as `precision.einsum(..., both_activations=True)`
tags them. A matmul of two weights is a constant and stays float.

Why not method interception: `nn.intercept_methods` sees module methods, so it
could swap the `dot_general` of `nn.Dense`, but the attention products inside
`dot_product_attention` are plain `jnp.einsum` calls that no module method
owns; they would stay float (or need attention rewritten). qwix's
`quantize_model` reaches them by patching jax functions during the call, but
applies qwix's numerics only, while the seam offers AQT and qwix behind one
name. Rewriting the jaxpr reaches every matmul, whatever framework wrote it,
with either backend, and runs once per trace: the compiled program is the same
as a hand-written quantized model's (docs/results/backends.md).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from quee_jax.core import precision
from quee_jax.core.precision import Level

# Primitives that call one inner jaxpr with their own operands: evaluated inline,
# so the matmuls inside them are rewritten too.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                    "custom_vjp_call", "checkpoint", "remat", "remat2", "named_call"})


def _inner_jaxprs(eqn) -> list:
  return list(jex_core.jaxprs_in_params(eqn.params))


def _has_matmul(jaxpr) -> bool:
  return any(eqn.primitive.name in ("dot_general", "conv_general_dilated")
             or any(_has_matmul(j) for j in _inner_jaxprs(eqn)) for eqn in jaxpr.eqns)


def _call_jaxpr(eqn):
  """(jaxpr, consts) of a call-like equation (every one in _CALLS holds one)."""
  value = next(v for v in eqn.params.values()
               if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)))
  if isinstance(value, jex_core.ClosedJaxpr):
    return value.jaxpr, value.consts
  return value, ()


def _dot(eqn, lhs, rhs, lhs_weight: bool, rhs_weight: bool, level: Level, backend: str):
  dims = eqn.params["dimension_numbers"]
  out_dtype = eqn.outvars[0].aval.dtype
  if lhs_weight and rhs_weight:  # a constant of the parameters: as written
    return eqn.primitive.bind(lhs, rhs, **eqn.params)
  if level.is_float:
    fn = lambda: eqn.primitive.bind(lhs, rhs, **eqn.params)
  else:
    bits = lambda weight: level.w_bits if weight else level.a_bits
    dg = precision.quantized_dot_general(bits(lhs_weight), bits(rhs_weight), backend)
    fn = lambda: dg(lhs, rhs, dims).astype(out_dtype)
  if lhs_weight or rhs_weight:
    return fn()
  with jax.named_scope(precision.ACT_X_ACT_SCOPE):  # the cost model charges a x a bits
    return fn()


def _evaluate(jaxpr, consts, args, weights, level: Level, backend: str, where: str
              ) -> tuple[list, list[bool]]:
  """The jaxpr's outputs, and for each whether it is computed from weights alone."""
  env, is_weight = {}, {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def weight(v):
    return True if isinstance(v, jex_core.Literal) else is_weight[v]

  for v, value, w in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args],
                         [True] * len(consts) + list(weights)):
    env[v], is_weight[v] = value, w
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    flags = [weight(v) for v in eqn.invars]
    name = eqn.primitive.name
    inner = _inner_jaxprs(eqn)
    out_flags = [all(flags)] * len(eqn.outvars)
    if name == "dot_general":
      outs = [_dot(eqn, *invals, *flags, level, backend)]
    elif name == "conv_general_dilated" and not level.is_float and not all(flags):
      raise ValueError(f"{where}: a convolution cannot run at level {level!r}: the precision"
                       " levels quantize dot_general only (keep convolutions in the embedding,"
                       " which runs float)")
    elif inner and any(_has_matmul(j) for j in inner):
      if name not in _CALLS:
        # At every level, float included: the cost model needs each matmul's operands.
        raise ValueError(f"{where}: a matmul inside `{name}` (a loop or branch) cannot be"
                         " rewritten to a precision level; give each block its own module call"
                         " instead of scanning over blocks")
      sub, sub_consts = _call_jaxpr(eqn)
      outs, out_flags = _evaluate(sub, sub_consts, invals, flags, level, backend, where)
    else:
      outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    for v, value, w in zip(eqn.outvars, outs, out_flags):
      env[v], is_weight[v] = value, w
  return [read(v) for v in jaxpr.outvars], [weight(v) for v in jaxpr.outvars]


def at_level(fn: Callable[[Any, Any], Any], level: Level | str,
             backend: str = precision.DEFAULT_BACKEND, *, where: str = "fn"
             ) -> Callable[[Any, Any], Any]:
  """`fn(params, x)` with every matmul at `level`, quantized by `backend`.

  Weights are the values computed from `params` alone; the rest are activations
  (module docstring). At `float` the matmuls run as written (activation x
  activation ones tagged for the cost model). `where` names the function in errors:
  a matmul inside a loop or branch, or a convolution at a quantized level.
  """
  level = precision.parse_level(level)
  precision.check_backend(backend)

  def run(params, x):
    jaxpr, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, x)
    n_params = len(jax.tree.leaves(params))
    leaves = jax.tree.leaves((params, x))
    weights = [True] * n_params + [False] * (len(leaves) - n_params)
    outs, _ = _evaluate(jaxpr.jaxpr, jaxpr.consts, leaves, weights, level, backend, where)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return run
