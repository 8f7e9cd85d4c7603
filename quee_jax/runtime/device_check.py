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
few real inputs there and on the host's CPU (every jaxlib has one) and compare
the predicted classes at every exit, and do the same for the error predictors
at their level (random weights).

Precision: both sides of the check run float matmuls at full float32
precision (`jax.default_matmul_precision("float32")`, no TF32), so that what
remains is float rounding, which a quantizer can still amplify into another
integer: a few flips are normal, a broken level disagrees on most samples.
The state tables and the runtime do not set it: they run at JAX's default
matmul precision, which on a GPU may compute float matmuls in TF32. So the
check vouches for the integer kernels and the float32 path, not for the exact
numbers the tables get there: their float matmuls (the float level, and those
around the quantized ones) can round differently from what was checked.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, Params, exit_logits
from quee_jax.gating import predictor

MIN_AGREEMENT = 0.95
PROB_TOLERANCE = 0.02
NUM_INPUTS = 256  # real inputs (backbone) or random rows per gate (predictors) compared


class DeviceMismatch(RuntimeError):
  """A device computes some precision level unlike the reference device."""


@dataclasses.dataclass(frozen=True)
class LevelCheck:
  """How the outputs of one level (or of the predictors) agree on the device and the reference."""

  level: str        # a backbone level, or "predictor@<level>"
  agreement: float  # backbone: fraction of (exit, sample) pairs with the same predicted class;
                    # predictor: fraction of predicted probabilities within PROB_TOLERANCE
  max_diff: float   # the largest |difference| of the logits (backbone) or probabilities


def level_logits(backbone: Backbone, params: Params, ladder, inputs, device
                 ) -> dict[str, np.ndarray]:
  """Every exit's logits [exits, N, C] at each level, every block at that level, on `device`."""
  params, inputs = jax.device_put((params, np.asarray(inputs)), device)
  out = {}
  for lv in precision.parse_ladder(ladder):
    fn = jax.jit(lambda p, x, lv=lv: exit_logits(backbone, p, x, (lv,) * backbone.num_blocks))
    with jax.default_matmul_precision("float32"):  # TF32 is not what this looks for
      out[lv.name] = np.asarray(fn(params, inputs))
  return out


def compare(logits: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> list[LevelCheck]:
  """Per level: agreement of the predicted classes and the largest logit difference."""
  if set(logits) != set(reference):
    raise ValueError(f"reference: expected the levels {sorted(logits)}, got {sorted(reference)}")
  out = []
  for name, a in logits.items():
    b = reference[name]
    if a.shape != b.shape:
      raise ValueError(f"reference: level {name} has logits of shape {b.shape}, expected {a.shape}")
    same = np.argmax(a, -1) == np.argmax(b, -1)
    out.append(LevelCheck(name, float(same.mean()), float(np.abs(a - b).max())))
  return out


def check_device(backbone: Backbone, params: Params, ladder, inputs, num_inputs: int = NUM_INPUTS,
                 device=None, reference=None, min_agreement: float = MIN_AGREEMENT
                 ) -> list[LevelCheck]:
  """Compares every level on the first num_inputs of `inputs` on `device` (default: the default
  device) with `reference` (default: the host's CPU); DeviceMismatch naming the levels whose
  predictions agree on fewer than min_agreement of the (exit, sample) pairs. Returns the
  checks (on a CPU, against itself)."""
  device = device or jax.devices()[0]
  reference = reference or jax.devices("cpu")[0]
  inputs = np.asarray(inputs[:num_inputs])
  checks = compare(level_logits(backbone, params, ladder, inputs, device),
                   level_logits(backbone, params, ladder, inputs, reference))
  _refuse([c for c in checks if c.agreement < min_agreement], device, reference, len(inputs))
  return checks


def check_predictor(level: str, num_gates: int, num_features: int, hidden: int,
                    num_candidates: int, num_inputs: int = NUM_INPUTS, device=None,
                    reference=None, min_agreement: float = MIN_AGREEMENT) -> LevelCheck:
  """Error predictors of this shape at `level` (`predictor.predict`, random weights and inputs:
  a kernel's correctness does not hang on them) on `device` and on `reference` (defaults as
  `check_device`); DeviceMismatch if fewer than min_agreement of the predicted probabilities
  agree within PROB_TOLERANCE."""
  device = device or jax.devices()[0]
  reference = reference or jax.devices("cpu")[0]
  # Host copies, so that each run puts everything on its own device.
  params = jax.tree.map(np.asarray, predictor.init(jax.random.key(0), num_gates, num_features,
                                                   num_candidates, hidden))
  x = np.random.default_rng(0).normal(size=(num_gates, num_inputs, num_features)).astype(np.float32)
  outs = []
  for d in (device, reference):
    with jax.default_device(d), jax.default_matmul_precision("float32"):
      outs.append(predictor.predict(params, x, np.arange(num_gates), level))
  diff = np.abs(outs[0] - outs[1])
  check = LevelCheck(f"predictor@{level}", float((diff <= PROB_TOLERANCE).mean()),
                     float(diff.max()))
  _refuse([check] if check.agreement < min_agreement else [], device, reference, num_inputs)
  return check


def _refuse(bad: list[LevelCheck], device, reference, num_inputs: int) -> None:
  if bad:
    raise DeviceMismatch(
        f"{device.device_kind} computes these levels unlike {reference.device_kind}: "
        + "; ".join(f"{c.level} agrees on {100 * c.agreement:.1f}% of its outputs"
                    f" (max |diff| {c.max_diff:.3g})" for c in bad)
        + f" on {num_inputs} inputs. Its quantized kernels give wrong results here;"
        " tables and runtimes built on it would be wrong. On NVIDIA GPUs, check that XLA_FLAGS"
        f" holds {precision.TRITON_GEMM_FLAG}=false: call quee_jax.avoid_triton_gemm() before"
        " jax starts (importing quee_jax does not); else run on another device or jax version.")


def summary(checks: list[LevelCheck]) -> str:
  """One line: how each check agreed."""
  return "device check against the CPU, outputs agreeing: " + ", ".join(
      f"{c.level} {100 * c.agreement:.1f}%" for c in checks)
