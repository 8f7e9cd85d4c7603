"""Does an accelerator compute every precision level as the CPU does?

Quantized matmuls lower to integer kernels (s8 x s8 -> s32) that each backend
implements its own way. A wrong kernel raises no error, only gives wrong
logits, and a state table or runtime built on it is silently wrong. (Seen on an
H100 with jax 0.11.2: XLA's Triton GEMM computed the error predictors' w8a8
dot, [N, 33] x [33, 16], wrong, and with autotuning off every quantized level
of the ViT; the runtime then got 37.5% of Fashion-MNIST test right. cuBLAS
computes them right, so the entry points call `quee_jax.avoid_triton_gemm()`
(`quee_jax.core.precision`) before jax starts, which turns Triton GEMM off;
this check catches a program that did not, and the next such kernel.) So the
scripts that run on an accelerator first run the backbone at every level on a
few real inputs there and on the host's CPU (every jaxlib has one), and do the
same for the error predictors at their level (random weights).

The rule. A quantized level is integer arithmetic wrapped in float parts
(layer norm, softmax, the quantization scales): the float parts may round in
the last bit differently on another device, and a quantizer can turn that into
a neighbouring integer, so a quantized forward cannot be required to match
exactly. What can be is the integer arithmetic itself. So the check stops
(`DeviceMismatch`) when
  1. any integer dot of the forward at the shapes it runs here — every
     `dot_general` on integer operands in the traced backbone at each integer
     level and in the predictors, found in their jaxprs — is not bit-exact:
     the dot of random operands of its dtypes (int8 in [-127, 127]; qwix's int4
     in [-8, 7]) on the device against the same dot on the host CPU (integer
     dots have no rounding, and the int32 sum of K products of int8 is exact for
     K < 2^17; tests/test_int8_dots.py checks
     the CPU's against numpy's int64 product). The shapes are those at the
     check's batch (NUM_INPUTS); a batch size that selects another kernel is
     not covered, which rule 3 and the bench's mismatch count backstop;
  2. a float path — the float level, predictors at float — is off by more
     than FLOAT_TOLERANCE of the reference's largest |logit| (backbone) or by
     more than PROB_TOLERANCE in a probability (predictors) on any sample;
  3. at any level, more than MAX_DIFFERING of the samples differ: their
     predicted class at some exit (backbone) or some probability beyond
     PROB_TOLERANCE (predictors). Quantizer rounding moves a few near-tie
     samples; 2% is what the bench allows between the runner and the
     simulated policy, beyond which tables from one device do not describe the
     other.
Each `LevelCheck` says how many samples differ and how many integer dots were
checked and came out wrong; `summary` prints them.

Precision: both sides run at JAX's default matmul precision, the one the state
tables and the runtime use (on a GPU float32 matmuls may run in TF32, which
FLOAT_TOLERANCE allows for: 2^-11 relative per operand through a dozen blocks
stays well below it, a wrong kernel is off by the logits' own scale). So the
check vouches for the numbers the tables get, not for a stricter precision
they never run.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.extend.core as jex
import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, Params, exit_logits
from quee_jax.gating import predictor

MAX_DIFFERING = 0.02     # share of the samples that may differ at one level (see rule 3)
FLOAT_TOLERANCE = 0.02   # float level: |logit difference| <= this x the largest |reference logit|
PROB_TOLERANCE = 0.02    # predictors: |probability difference| beyond this makes a sample differ
NUM_INPUTS = 256  # real inputs (backbone) or random rows per gate (predictors) compared


class DeviceMismatch(RuntimeError):
  """A device computes some precision level unlike the reference device."""


@dataclasses.dataclass(frozen=True)
class IntDot:
  """One integer dot as a forward runs it: operand shapes, `dot_general` dimension numbers and
  operand dtypes (int8 under AQT; qwix stores 2-4 bits in int4)."""

  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  dims: tuple  # ((lhs contracting, rhs contracting), (lhs batch, rhs batch))
  lhs_dtype: str = "int8"
  rhs_dtype: str = "int8"

  def __str__(self) -> str:
    return f"[{','.join(map(str, self.lhs))}]x[{','.join(map(str, self.rhs))}]"


@dataclasses.dataclass(frozen=True)
class LevelCheck:
  """How the outputs of one level (or of the predictors) agree on the device and the reference."""

  level: str        # a backbone level, or "predictor@<level>"
  agreement: float  # backbone: fraction of (exit, sample) pairs with the same predicted class;
                    # predictor: fraction of predicted probabilities within PROB_TOLERANCE
  max_diff: float   # the largest |difference| of the logits (backbone) or probabilities
  differing: int = 0    # samples that differ: another class at some exit (backbone), or some
                        # probability beyond PROB_TOLERANCE (predictor)
  num_samples: int = 0  # samples compared
  scale: float = 0.0    # the largest |reference logit| (backbone), 1 (predictor probabilities)
  int_dots: int = 0     # distinct integer dots of this level checked bit for bit
  wrong_dots: tuple[str, ...] = ()  # those not bit-exact on the device
  integer: bool = False  # an integer level (rule 3 bounds its samples); else a float path (rule 2)

  def failures(self, max_differing: float = MAX_DIFFERING) -> list[str]:
    """Why this level breaks the rule (module docstring), in words; [] if it does not."""
    out = []
    if self.wrong_dots:
      out.append(f"its integer dots {', '.join(self.wrong_dots)} are not exact")
    tol = PROB_TOLERANCE if self.level.startswith("predictor@") else FLOAT_TOLERANCE * self.scale
    if not self.integer and self.max_diff > tol:
      out.append(f"a float path off by {self.max_diff:.3g} (tolerance {tol:.3g})")
    if self.differing > max_differing * self.num_samples:
      out.append(f"{self.differing} of {self.num_samples} samples differ"
                 f" (at most {100 * max_differing:g}% may)")
    return out


def _dots_in(jaxpr, out: dict) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and all(  # jnp's: numpy's misses int4
        jax.numpy.issubdtype(v.aval.dtype, jax.numpy.integer) for v in eqn.invars):
      lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars)
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
      lhs_dtype, rhs_dtype = (str(v.aval.dtype) for v in eqn.invars)
      out[IntDot(lhs, rhs, dims, lhs_dtype, rhs_dtype)] = None
    for sub in jex.jaxprs_in_params(eqn.params):
      _dots_in(sub, out)


def integer_dots(fn: Callable, *args) -> list[IntDot]:
  """The distinct dots on integer operands that `fn(*args)` runs, read off its jaxpr."""
  out: dict[IntDot, None] = {}  # ordered, deduplicated
  _dots_in(jax.make_jaxpr(fn)(*args).jaxpr, out)
  return list(out)


# The codes each container holds: AQT's int8 in [-127, 127], qwix's int4 in [-8, 7].
_CODES = {"int8": (-127, 127), "int4": (-8, 7)}


def _operand(rng: np.random.Generator, shape, dtype: str):
  low, high = _CODES.get(dtype, _CODES["int8"])
  values = rng.integers(low, high + 1, size=shape, dtype=np.int8)
  return values if dtype == "int8" else jax.numpy.asarray(values, dtype=dtype)


def run_int_dots(dots: list[IntDot], device) -> list[np.ndarray]:
  """Each dot of fixed random operands of its dtypes (every code the container holds) on
  `device`, as int32."""
  rng = np.random.default_rng(0)
  out = []
  for d in dots:
    a, b = _operand(rng, d.lhs, d.lhs_dtype), _operand(rng, d.rhs, d.rhs_dtype)
    fn = jax.jit(lambda a, b, dims=d.dims: jax.lax.dot_general(
        a, b, dims, preferred_element_type=np.int32))
    out.append(np.asarray(fn(*jax.device_put((a, b), device))))
  return out


def wrong_dots(dots: list[IntDot], device, reference) -> list[str | None]:
  """Per dot: None if its device result equals the reference's in every bit, else what differs."""
  got, want = run_int_dots(dots, device), run_int_dots(dots, reference)
  return [None if np.array_equal(g, w) else f"{d} ({int((g != w).sum())} of {w.size} outputs)"
          for d, g, w in zip(dots, got, want)]


def _shapes(tree):
  """Abstract values of a pytree of arrays: tracing needs no data, nor a copy of it."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      np.shape(a), a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype), tree)


def level_logits(backbone: Backbone, params: Params, ladder, inputs, device
                 ) -> dict[str, np.ndarray]:
  """Every exit's logits [exits, N, C] at each level, every block at that level, on `device`,
  at JAX's default matmul precision (the tables')."""
  params, inputs = jax.device_put((params, np.asarray(inputs)), device)
  out = {}
  for lv in precision.parse_ladder(ladder):
    fn = jax.jit(lambda p, x, lv=lv: exit_logits(backbone, p, x, (lv,) * backbone.num_blocks))
    out[lv.name] = np.asarray(fn(params, inputs))
  return out


def level_dots(backbone: Backbone, params: Params, ladder, inputs) -> dict[str, list[IntDot]]:
  """Per level, the integer dots its forward on `inputs` runs (none at float)."""
  return {lv.name: integer_dots(
      lambda p, x, lv=lv: exit_logits(backbone, p, x, (lv,) * backbone.num_blocks), params, inputs)
      for lv in precision.parse_ladder(ladder)}


def compare(logits: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[LevelCheck]:
  """Per level: agreement of the predicted classes, samples whose class differs at some exit,
  and the largest logit difference (against the reference's largest |logit|)."""
  if set(logits) != set(reference):
    raise ValueError(f"reference: expected the levels {sorted(logits)}, got {sorted(reference)}")
  out = []
  for name, a in logits.items():
    b = reference[name]
    if a.shape != b.shape:
      raise ValueError(f"reference: level {name} has logits of shape {b.shape}, expected {a.shape}")
    same = np.argmax(a, -1) == np.argmax(b, -1)  # [exits, N]
    out.append(LevelCheck(name, float(same.mean()), float(np.abs(a - b).max()),
                          differing=int((~same.all(axis=0)).sum()), num_samples=a.shape[1],
                          scale=float(np.abs(b).max()),
                          integer=precision.parse_level(name) != precision.FLOAT))
  return out


def check_device(backbone: Backbone, params: Params, ladder, inputs, num_inputs: int = NUM_INPUTS,
                 device=None, reference=None, max_differing: float = MAX_DIFFERING
                 ) -> list[LevelCheck]:
  """Checks every level on the first num_inputs of `inputs` on `device` (default: the default
  device) against `reference` (default: the host's CPU) by the rule of the module docstring:
  its integer dots bit-exact, the float level within FLOAT_TOLERANCE, at most max_differing of
  the samples with another class at some exit. DeviceMismatch naming the levels that break it.
  Returns the checks (on a CPU, against itself)."""
  # This process's devices (under several processes jax.devices()[0] may be another's).
  device = device or jax.local_devices()[0]
  reference = reference or jax.local_devices(backend="cpu")[0]
  inputs = np.asarray(inputs[:num_inputs])
  dots = level_dots(backbone, _shapes(params), ladder, _shapes(inputs))
  unique = list(dict.fromkeys(d for ds in dots.values() for d in ds))  # levels share shapes
  wrong = dict(zip(unique, wrong_dots(unique, device, reference)))
  checks = [dataclasses.replace(c, int_dots=len(dots[c.level]),
                                wrong_dots=tuple(wrong[d] for d in dots[c.level] if wrong[d]))
            for c in compare(level_logits(backbone, params, ladder, inputs, device),
                             level_logits(backbone, params, ladder, inputs, reference))]
  _refuse(checks, device, reference, max_differing)
  return checks


def check_predictor(level: str, num_gates: int, num_features: int, hidden: int,
                    num_candidates: int, num_inputs: int = NUM_INPUTS, device=None,
                    reference=None, max_differing: float = MAX_DIFFERING) -> LevelCheck:
  """Error predictors of this shape at `level` (`predictor.predict`, random weights and inputs:
  a kernel's correctness does not hang on them) on `device` and on `reference` (defaults as
  `check_device`), by the same rule: their integer dots bit-exact; at float every probability
  within PROB_TOLERANCE; else at most max_differing of the (gate, row) samples with a
  probability beyond it. DeviceMismatch if not."""
  device = device or jax.local_devices()[0]
  reference = reference or jax.local_devices(backend="cpu")[0]
  lvl = precision.parse_level(level)
  # Host copies, so that each run puts everything on its own device.
  params = jax.tree.map(np.asarray, predictor.init(jax.random.key(0), num_gates, num_features,
                                                   num_candidates, hidden))
  x = np.random.default_rng(0).normal(size=(num_gates, num_inputs, num_features)).astype(np.float32)
  gates = np.arange(num_gates)
  mlp = {k: params[k] for k in predictor.MLP_KEYS}
  # As `predictor.predict` runs it (vmapped over gates, batched dots), and as the runtime
  # does, one gate at a time ([N, F] x [F, hidden], the shape Triton GEMM got wrong).
  dots = list(dict.fromkeys(integer_dots(
      lambda m, x, g: jax.vmap(lambda xx, gg: predictor.logits(m, xx, gg, lvl))(x, g),
      _shapes(mlp), _shapes(x), _shapes(gates)) + integer_dots(
      lambda m, x: predictor.logits(m, x, 0, lvl), _shapes(mlp), _shapes(x[0]))))
  outs = []
  for d in (device, reference):
    with jax.default_device(d):
      outs.append(predictor.predict(params, x, gates, level))
  diff = np.abs(outs[0] - outs[1])  # [gates, rows, candidates]
  check = LevelCheck(f"predictor@{lvl.name}", float((diff <= PROB_TOLERANCE).mean()),
                     float(diff.max()), differing=int((diff > PROB_TOLERANCE).any(-1).sum()),
                     num_samples=num_gates * num_inputs, scale=1.0, int_dots=len(dots),
                     wrong_dots=tuple(w for w in wrong_dots(dots, device, reference) if w),
                     integer=lvl != precision.FLOAT)
  _refuse([check], device, reference, max_differing)
  return check


def _refuse(checks: list[LevelCheck], device, reference, max_differing: float) -> None:
  bad = [(c, c.failures(max_differing)) for c in checks]
  bad = [(c, why) for c, why in bad if why]
  if bad:
    raise DeviceMismatch(
        f"{device.device_kind} computes these levels unlike {reference.device_kind}: "
        + "; ".join(f"{c.level}: " + ", ".join(why) + f" ({c.differing} of {c.num_samples}"
                    f" samples differ, max |diff| {c.max_diff:.3g})" for c, why in bad)
        + ". Its kernels give wrong results here; tables and runtimes built on it would be"
        " wrong. On NVIDIA GPUs, check that XLA_FLAGS"
        f" holds {precision.TRITON_GEMM_FLAG}=false: call quee_jax.avoid_triton_gemm() before"
        " jax starts (importing quee_jax does not); else run on another device or jax version.")


def summary(checks: list[LevelCheck]) -> str:
  """One line: per check, its outputs agreeing, the samples that differ and its integer dots
  checked bit for bit."""
  dots = [f"{c.level} {c.int_dots - len(c.wrong_dots)}/{c.int_dots}" for c in checks if c.int_dots]
  return ("device check against the CPU, outputs agreeing: "
          + ", ".join(f"{c.level} {100 * c.agreement:.1f}%" for c in checks)
          + "; samples differing: " + ", ".join(f"{c.level} {c.differing}/{c.num_samples}"
                                                for c in checks)
          + ("; integer dots bit-exact: " + ", ".join(dots) if dots else ""))
