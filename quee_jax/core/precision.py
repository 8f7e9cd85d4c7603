"""Precision levels and the one place where quantization enters the models.

A *level* is either float or a pair (weight bits, activation bits). Every
matmul of a backbone goes through `dot_general`, `dense` or `einsum` below with
the level it should run at, so the same float parameters run at any level
inside one `jit`. Two backends do the quantization, chosen by name and nowhere
else: AQT (aqtp, `aqt.jax.v2`; "aqt", the default) and qwix (Google's successor
to AQT; "qwix"), through each library's public dot_general.

Quantization choices (post-training, no calibration data):
  * weights: symmetric abs-max scale per output channel;
  * activations: symmetric abs-max scale per token (the contracted axis), so a
    sample's output never depends on its batch-mates: batched state tables and
    the real adaptive runtime then agree sample by sample;
  * every integer side is stored in an int8 container, so mixed pairs such as
    w4a8 lower to one s8 x s8 -> s32 dot instead of a slow s32 one;
  * attention QK^T and AV multiply two activations: both sides are quantized at
    the activation bits (`einsum(..., both_activations=True)`).
The two backends share these conventions and the scale (abs-max / (2^(b-1) - 0.5))
and differ where a value rounds past the edge: AQT clips to +-(2^(b-1) - 1), qwix
lets the negative edge reach -2^(b-1) (a 2-bit weight takes 4 values, not 3).
AQT stores every width in int8 (above); qwix stores 2-4 bits in int4.
docs/results/backends.md measures how far apart they land and how fast each runs.

On NVIDIA GPUs, XLA's Triton GEMM emitter computed some s8 x s8 -> s32 dots
wrong (measured on an H100 with jax 0.11.2: a plain `lax.dot_general` of
[256, 33] x [33, 16] int8 matched the exact product on 0% of outputs; with
autotuning off, every quantized level of the ViT was wrong), while cuBLAS got
all of them right (docs/results/gpu_numerics.md; `experiments/analysis/int8_dots.py`
repeats the check on any device). `avoid_triton_gemm()` adds
`--xla_gpu_enable_triton_gemm=false` to XLA_FLAGS; the entry points in
`experiments/` and the API tour notebook call it before jax starts, and code
that imports these functions into its own program should do the same on a GPU
(importing quee_jax changes nothing by itself). `quee_jax.runtime.device_check`
catches what gets through.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping, Set
from typing import Callable

import jax
import jax.numpy as jnp
import qwix
from aqt.jax.v2 import aqt_dot_general
from aqt.jax.v2 import config as aqt_config
from jax import lax

MIN_BITS = 2
MAX_BITS = 8
# Name scope that marks activation x activation matmuls, so the cost model can
# charge them a_bits x a_bits instead of w_bits x a_bits.
ACT_X_ACT_SCOPE = "quee_act_x_act"

_LEVEL_RE = re.compile(r"^w(\d+)a(\d+)$")

TRITON_GEMM_FLAG = "--xla_gpu_enable_triton_gemm"


def xla_flags_avoiding_triton_gemm(flags: str | None) -> str:
  """XLA_FLAGS with Triton GEMM off (module docstring), unless `flags` already sets it."""
  flags = (flags or "").strip()
  if re.search(rf"(^|\s){TRITON_GEMM_FLAG}(=|\s|$)", flags):  # the user's choice stands
    return flags
  return f"{flags} {TRITON_GEMM_FLAG}=false".strip()


def avoid_triton_gemm() -> str:
  """Turns XLA's Triton GEMM off for this process (module docstring); returns XLA_FLAGS.

  XLA reads XLA_FLAGS when jax starts its backends, so call this before the
  first computation. A user's own setting of the flag stands. Harmless where
  there is no GPU.
  """
  os.environ["XLA_FLAGS"] = xla_flags_avoiding_triton_gemm(os.environ.get("XLA_FLAGS"))
  return os.environ["XLA_FLAGS"]


@functools.cache
def _bits(name: str) -> tuple[int, int] | None:
  """(weight bits, activation bits) of a canonical level name; None for float."""
  if name == "float":
    return None
  match = _LEVEL_RE.match(name)
  return int(match.group(1)), int(match.group(2))


class Level(str):
  """A precision level, which is its own name: 'float' or 'w<bits>a<bits>' (e.g. 'w4a8').

  A Level is a `str`, so a ladder prints, compares with config strings and goes
  into JSON as it is; its bits are parsed once, when it is made. Build one with
  `parse_level` (or `Level(name)`, `Level.from_bits(w, a)`).
  """

  __slots__ = ()

  def __new__(cls, name: "str | Level") -> "Level":
    if isinstance(name, Level):
      return name
    if not isinstance(name, str):
      raise ValueError(f"level: expected a name such as 'float' or 'w4a4', got {name!r}")
    canon = name.strip().lower()
    if canon != "float":
      match = _LEVEL_RE.match(canon)
      bits = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
      if not all(MIN_BITS <= b <= MAX_BITS for b in bits):
        raise ValueError(
            f"level: expected 'float' or 'w<bits>a<bits>' with bits in "
            f"[{MIN_BITS}, {MAX_BITS}] (e.g. 'w8a8', 'w4a4'), got {name!r}")
      canon = f"w{bits[0]}a{bits[1]}"
    return super().__new__(cls, canon)

  @classmethod
  def from_bits(cls, w_bits: int, a_bits: int) -> "Level":
    """The level with integer weights and activations of these widths."""
    for arg, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
      if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"Level: {arg} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return cls(f"w{w_bits}a{a_bits}")

  @property
  def is_float(self) -> bool:
    return _bits(str(self)) is None

  @property
  def w_bits(self) -> int | None:
    bits = _bits(str(self))
    return None if bits is None else bits[0]

  @property
  def a_bits(self) -> int | None:
    bits = _bits(str(self))
    return None if bits is None else bits[1]

  @property
  def name(self) -> str:
    return str(self)


FLOAT = Level("float")
Ladder = tuple[Level, ...]


def parse_level(level: str | Level) -> Level:
  """Parses 'float' or 'w<bits>a<bits>' (any case, e.g. 'W4A8'); a Level passes through."""
  return Level(level)


def canonical_name(name: str) -> str:
  """`name` as a Level if it parses as one ('W4A4' -> 'w4a4'), else unchanged: for looking a
  user's name up in a ladder, where a name that is no level is simply not found."""
  try:
    return parse_level(name)
  except ValueError:
    return name


def parse_ladder(levels: str | Iterable[str | Level]) -> Ladder:
  """Parses an ordered ladder, e.g. 'float,w4a4,w2a4' or ['float', 'w4a4'].

  The order is the user's (by convention most precise first); empty entries and
  duplicates are rejected, since every level indexes a distinct set of states.
  """
  if isinstance(levels, str):
    items = levels.split(",")
    if any(not item.strip() for item in items) and levels.strip():
      raise ValueError(f"ladder: expected comma-separated levels, got an empty entry in {levels!r}")
    levels = [item for item in items if item.strip()]
  elif isinstance(levels, (Set, Mapping)) or not isinstance(levels, Iterable):
    raise ValueError(f"ladder: expected a comma-separated string or an ordered sequence of"
                     f" levels, got {levels!r}")
  ladder = tuple(parse_level(level) for level in levels)
  if not ladder:
    raise ValueError("ladder: expected at least one level, got none")
  if len(set(ladder)) != len(ladder):
    raise ValueError(f"ladder: levels must be distinct, got {list(ladder)}")
  return ladder


BACKENDS = ("aqt", "qwix")
DEFAULT_BACKEND = "aqt"


def check_backend(backend: str, arg: str = "backend") -> str:
  """`backend` if it names a quantization backend; ValueError naming `arg` otherwise."""
  if backend not in BACKENDS:
    raise ValueError(f"{arg}: expected one of {BACKENDS}, got {backend!r}")
  return backend


def _aqt_config(lhs_bits: int, rhs_bits: int):
  # bwd_bits=None: inference only, so no stochastic rounding and no PRNG key.
  cfg = aqt_config.dot_general_make(lhs_bits=lhs_bits, rhs_bits=rhs_bits,
                                    bwd_bits=None)
  # AQT picks int4 containers for 4 bits; int8 everywhere keeps one fast
  # s8 x s8 -> s32 dot for every pair of bit widths.
  for quantizer in (cfg.fwd.dg_quantizer.lhs, cfg.fwd.dg_quantizer.rhs):
    quantizer.numerics.dtype = jnp.int8
  return cfg


@functools.cache
def _aqt_dot_general(lhs_bits: int, rhs_bits: int) -> Callable:
  cfg = _aqt_config(lhs_bits, rhs_bits)

  def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type  # AQT decides both
    # AQT asserts jax arrays; numpy operands (e.g. loaded weights) are common.
    return cfg(jnp.asarray(lhs), jnp.asarray(rhs), dimension_numbers)

  return dot


def qwix_qtype(bits: int):
  """qwix's name of a signed integer width: jnp dtypes for 8 and 4 bits, 'int<b>' otherwise."""
  return {8: jnp.int8, 4: jnp.int4}.get(bits, f"int{bits}")


def _uncontracted(ndim: int, contracting) -> list[int]:
  return [a for a in range(ndim) if a not in contracting]


# qwix maps a row's abs-max to (2^(b-1) - 0.5) scale units, a rounding tie: whether
# the row's negative extreme lands on -2^(b-1) or one code above then turns on the
# last bit of float arithmetic, so two programs equal in exact arithmetic (the
# project's ViT and the same ViT in linen, or a batch and its compacted rows)
# disagree on ~8% of predictions at w4a4. Shrinking the calibrated range by 1e-5
# (qwix's 'absmax,<scale>') moves the extreme off the tie: it always lands on
# -2^(b-1) (and +2^(b-1) - 1), whatever the rounding of the float ops before it.
QWIX_CALIBRATION = "absmax,0.99999"


@functools.cache
def _qwix_dot_general(lhs_bits: int, rhs_bits: int) -> Callable:
  lhs_type, rhs_type = qwix_qtype(lhs_bits), qwix_qtype(rhs_bits)

  def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type  # as AQT: the backend decides both
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    (lhs_contract, rhs_contract), _ = dimension_numbers
    # One abs-max scale per row of every uncontracted axis: per token for activations,
    # per output channel for weights, as in AQT's default calibration.
    q_lhs = qwix.quantize(lhs, lhs_type, calibration_method=QWIX_CALIBRATION,
                          channelwise_axes=_uncontracted(lhs.ndim, lhs_contract))
    q_rhs = qwix.quantize(rhs, rhs_type, calibration_method=QWIX_CALIBRATION,
                          channelwise_axes=_uncontracted(rhs.ndim, rhs_contract))
    if lhs.ndim == 2 and rhs.ndim == 2 and max(lhs_bits, rhs_bits) <= 4:
      # XLA's CPU compiler (jax 0.10) rejects a 2-D x 2-D dot of two int4 operands
      # ("custom element sizes on non-sub-byte types") and runs the 3-D one exactly:
      # a unit axis in front of lhs, a free axis of the product, which dot_general
      # places right after the batch axes; removed there.
      (lc, rc), (lb, rb) = dimension_numbers
      dims = ((tuple(a + 1 for a in lc), rc), (tuple(a + 1 for a in lb), rb))
      q_lhs = jax.tree.map(lambda a: a[None], q_lhs)
      return jnp.squeeze(qwix.dot_general(q_lhs, q_rhs, dims), axis=len(lb))
    return qwix.dot_general(q_lhs, q_rhs, dimension_numbers)

  return dot


def qwix_rule(level: Level, module_path: str = ".*") -> qwix.QuantizationRule:
  """The seam's qwix conventions at an integer `level` as a rule of qwix's own Flax route
  (`qwix.quantize_model(module, qwix.PtqProvider([rule]))`), which quantizes a linen or NNX
  module's matmuls as `dot_general(level, backend="qwix")` does."""
  level = parse_level(level)
  if level.is_float:
    raise ValueError("level: qwix rules quantize; expected an integer level, got 'float'")
  return qwix.QuantizationRule(
      module_path=module_path, weight_qtype=qwix_qtype(level.w_bits),
      act_qtype=qwix_qtype(level.a_bits), weight_calibration_method=QWIX_CALIBRATION,
      act_calibration_method=QWIX_CALIBRATION)


_DOT_GENERALS = {"aqt": _aqt_dot_general, "qwix": _qwix_dot_general}


def quantized_dot_general(lhs_bits: int, rhs_bits: int, backend: str = DEFAULT_BACKEND
                          ) -> Callable:
  """A `lax.dot_general`-compatible function quantizing lhs to lhs_bits and rhs to rhs_bits
  (symmetric abs-max, one scale per row of every uncontracted axis) with `backend`."""
  return _DOT_GENERALS[check_backend(backend)](lhs_bits, rhs_bits)


def dot_general(level: Level, *, both_activations: bool = False,
                backend: str = DEFAULT_BACKEND) -> Callable:
  """A `lax.dot_general`-compatible function at `level` (lhs = activations).

  `float` returns `lax.dot_general` itself: no quantization code runs at that level.
  """
  level = parse_level(level)
  check_backend(backend)
  if level.is_float:
    return lax.dot_general
  rhs_bits = level.a_bits if both_activations else level.w_bits
  return quantized_dot_general(level.a_bits, rhs_bits, backend)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
          level: Level, backend: str = DEFAULT_BACKEND) -> jax.Array:
  """x @ kernel + bias with the matmul at `level` (kernel: [in, out])."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  y = dot_general(level, backend=backend)(x, kernel, dims)
  return y if bias is None else y + bias


def einsum(eqn: str, lhs: jax.Array, rhs: jax.Array, level: Level, *,
           both_activations: bool = False, backend: str = DEFAULT_BACKEND) -> jax.Array:
  """A two-operand einsum at `level`; set both_activations for QK^T and AV."""
  if both_activations:
    with jax.named_scope(ACT_X_ACT_SCOPE):
      return _einsum(eqn, lhs, rhs, level, both_activations, backend)
  return _einsum(eqn, lhs, rhs, level, both_activations, backend)


def _einsum(eqn, lhs, rhs, level, both_activations, backend):
  dg = dot_general(level, both_activations=both_activations, backend=backend)
  if dg is lax.dot_general:
    return jnp.einsum(eqn, lhs, rhs)
  # AQT's einsum is jnp.einsum's contraction with the dot_general injected (and no jit
  # around it); it serves any backend's dot_general.
  return aqt_dot_general.einsum(eqn, lhs, rhs, dg=dg)
