"""Counted cost: MACs read off jaxprs, BOPs per precision level, normalization.

Counted cost is kept apart from measured time (see runtime). MACs are counted
per sample from the `dot_general` and convolution equations of a function's
jaxpr, so nothing is hand-derived per architecture. BOPs = MACs x weight bits x
activation bits; a matmul of two activations (attention QK^T, AV, tagged by
`precision.einsum(..., both_activations=True)`) counts a_bits x a_bits. Float is
counted as `float_bits` x `float_bits` (16 x 16, bf16, by default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.precision import FLOAT, Ladder, Level

UNITS = ("bops", "macs")


@dataclasses.dataclass(frozen=True)
class MacCount:
  """Multiply-accumulates of one call: weight x activation and activation x activation."""

  weight: int = 0
  act_x_act: int = 0

  @property
  def total(self) -> int:
    return self.weight + self.act_x_act

  def __add__(self, other: "MacCount") -> "MacCount":
    return MacCount(self.weight + other.weight, self.act_x_act + other.act_x_act)

  def scale(self, k: int) -> "MacCount":
    return MacCount(self.weight * k, self.act_x_act * k)


def _dot_general_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  # Every lhs element meets every free rhs column once.
  return math.prod(lhs) * math.prod(rhs_free)


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  # Each output element reads one kernel slice: in_features/groups x window.
  return math.prod(out) * (math.prod(rhs) // rhs[out_feature_dim])


def _sub_jaxprs(value) -> list:
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _count(jaxpr, in_act_scope: bool) -> MacCount:
  count = MacCount()
  for eqn in jaxpr.eqns:
    act = in_act_scope or precision.ACT_X_ACT_SCOPE in str(eqn.source_info.name_stack)
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      macs = _dot_general_macs(eqn) if name == "dot_general" else _conv_macs(eqn)
      count += MacCount(0, macs) if act else MacCount(macs, 0)
      continue
    if name == "cond":
      branches = [_count(j, act) for j in _sub_jaxprs(eqn.params["branches"])]
      # Only one branch runs: charge the most expensive (an upper bound).
      count += max(branches, key=lambda c: c.total)
      continue
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if name == "while" and any(_count(j, act).total for j in subs):
      raise ValueError("count_macs: matmuls inside a while loop have no static trip count")
    repeat = eqn.params["length"] if name == "scan" else 1
    for sub in subs:
      count += _count(sub, act).scale(repeat)
  return count


def count_macs(fn: Callable, *args: Any) -> MacCount:
  """MACs of `fn(*args)` (arrays or jax.ShapeDtypeStruct), from its jaxpr."""
  closed = jax.make_jaxpr(fn)(*args)
  return _count(closed.jaxpr, False)


def level_bits(level: Level, float_bits: int = 16) -> tuple[int, int]:
  """(weight bits, activation bits) a level is charged."""
  return (float_bits, float_bits) if level.is_float else (level.w_bits, level.a_bits)


def bops(macs: MacCount, level: Level, float_bits: int = 16) -> int:
  """Bit operations of a call at `level`."""
  w_bits, a_bits = level_bits(level, float_bits)
  return macs.weight * w_bits * a_bits + macs.act_x_act * a_bits * a_bits


@dataclasses.dataclass(frozen=True)
class CostTable:
  """Per-sample costs of a backbone's pieces, normalized so the full model is 1.

  The full model is: embedding + every block at the top level (the ladder's
  most expensive) + the last exit head.

  Attributes:
    unit: 'bops' or 'macs'.
    float_bits: bits float is charged as (per operand) in BOPs.
    ladder: the levels, the column order of `blocks`.
    embed: the embedding's cost (float).
    blocks: [num_blocks, len(ladder)] cost of block i at level q.
    heads: [num_exits] cost of each exit head (float).
    full_model: the raw (unnormalized) count of the full model, in `unit`.
  """

  unit: str
  float_bits: int
  ladder: Ladder
  embed: float
  blocks: np.ndarray
  heads: np.ndarray
  full_model: float

  def to_dict(self) -> dict:
    return {"unit": self.unit, "float_bits": self.float_bits, "ladder": list(self.ladder),
            "embed": self.embed, "blocks": self.blocks.tolist(),
            "heads": self.heads.tolist(), "full_model": self.full_model}

  @classmethod
  def from_dict(cls, d: dict) -> "CostTable":
    return cls(unit=d["unit"], float_bits=int(d["float_bits"]),
               ladder=precision.parse_ladder(d["ladder"]), embed=float(d["embed"]), blocks=np.asarray(d["blocks"], np.float64),
               heads=np.asarray(d["heads"], np.float64), full_model=float(d["full_model"]))

  def __eq__(self, other) -> bool:
    return isinstance(other, CostTable) and self.to_dict() == other.to_dict()

  def select(self, levels: Ladder | Sequence[str]) -> "CostTable":
    """The costs of some of the levels, in the given order; the normalization is unchanged."""
    levels = precision.parse_ladder(levels)
    if not set(levels) <= set(self.ladder):
      raise ValueError(f"levels: expected distinct levels of {list(self.ladder)}, got {list(levels)}")
    cols = [self.ladder.index(q) for q in levels]
    return dataclasses.replace(self, ladder=levels, blocks=self.blocks[:, cols])


def _charge(macs: MacCount, level: Level, unit: str, float_bits: int) -> float:
  return float(macs.total if unit == "macs" else bops(macs, level, float_bits))


def backbone_macs(backbone: Backbone, params: Params, inputs: jax.Array
                  ) -> tuple[MacCount, list[MacCount], list[MacCount]]:
  """Per-sample MACs of (embedding, each block, each exit head), traced abstractly."""
  x1 = jax.ShapeDtypeStruct((1, *inputs.shape[1:]), inputs.dtype)
  h1 = jax.eval_shape(backbone.embed, params, x1)
  embed = count_macs(backbone.embed, params, x1)
  blocks = [count_macs(lambda p, h, i=i: backbone.block(p, i, h, FLOAT), params, h1)
            for i in range(backbone.num_blocks)]
  heads = [count_macs(lambda p, h, e=e: backbone.exit_head(p, e, h), params, h1)
           for e in range(len(backbone.exits))]
  return embed, blocks, heads


def backbone_costs(backbone: Backbone, params: Params, inputs: jax.Array, ladder: Ladder,
                   unit: str = "bops", float_bits: int = 16) -> CostTable:
  """Normalized per-sample cost of every piece of `backbone` at every level of `ladder`.

  Args:
    backbone: the multi-exit model.
    params: its parameters (only shapes are used).
    inputs: a batch of inputs (or a ShapeDtypeStruct); only its shape and dtype matter.
    ladder: the precision levels.
    unit: 'bops' (MACs x w_bits x a_bits) or 'macs' (precision ignored).
    float_bits: bits per operand charged for float matmuls.
  """
  if unit not in UNITS:
    raise ValueError(f"unit: expected one of {UNITS}, got {unit!r}")
  if isinstance(float_bits, bool) or not isinstance(float_bits, int) or float_bits < 1:
    raise ValueError(f"float_bits: expected a positive int, got {float_bits!r}")
  ladder = precision.parse_ladder(ladder)
  embed_macs, block_macs, head_macs = backbone_macs(backbone, params, inputs)
  embed = _charge(embed_macs, FLOAT, unit, float_bits)
  blocks = np.array([[_charge(m, level, unit, float_bits) for level in ladder]
                     for m in block_macs], np.float64)
  heads = np.array([_charge(m, FLOAT, unit, float_bits) for m in head_macs], np.float64)
  top = int(np.argmax(blocks.sum(axis=0)))
  full = embed + blocks[:, top].sum() + heads[-1]
  return CostTable(unit=unit, float_bits=float_bits, ladder=ladder,
                   embed=embed / full, blocks=blocks / full, heads=heads / full,
                   full_model=float(full))
