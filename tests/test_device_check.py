"""The device check: a device that computes a level unlike the CPU is refused by name."""

import jax
import numpy as np
import pytest
from conftest import images

import quee_jax as q
from quee_jax.gating import predictor
from quee_jax.runtime import device_check

LADDER = "float,w8a8,w4a4"


def test_the_cpu_agrees_with_itself_on_every_level(tiny):
  _, params, bb = tiny
  checks = device_check.check_device(bb, params, LADDER, images(64))
  assert [c.level for c in checks] == ["float", "w8a8", "w4a4"]
  assert all(c.agreement == 1.0 and c.max_diff == 0.0 and c.differing == 0 for c in checks)
  assert [c.integer for c in checks] == [False, True, True] and checks[0].int_dots == 0
  # the ViT's block matmuls at an integer level: qkv, QK^T, AV, out, mlp in and out
  assert checks[1].int_dots == checks[2].int_dots == 6 and not checks[1].wrong_dots
  assert device_check.summary(checks) == (
      "device check against the CPU, outputs agreeing: float 100.0%, w8a8 100.0%, w4a4 100.0%;"
      " samples differing: float 0/64, w8a8 0/64, w4a4 0/64;"
      " integer dots bit-exact: w8a8 6/6, w4a4 6/6")


def test_compare_counts_flipped_predictions_per_level():
  rng = np.random.default_rng(0)
  ref = {"float": rng.normal(size=(3, 40, 5)), "w4a4": rng.normal(size=(3, 40, 5))}
  got = {"float": ref["float"] + 1e-6, "w4a4": ref["w4a4"].copy()}
  got["w4a4"][1, :10] = -got["w4a4"][1, :10]  # 10 of 120 (exit, sample) pairs: argmax moves
  flipped = (np.argmax(got["w4a4"], -1) != np.argmax(ref["w4a4"], -1)).sum()
  checks = {c.level: c for c in device_check.compare(got, ref)}
  assert checks["float"].agreement == 1.0 and checks["float"].max_diff < 1e-5
  assert checks["w4a4"].agreement == pytest.approx(1 - flipped / 120) and flipped >= 8
  # samples: those flipped at some exit (all at exit 1 here), of 40
  assert checks["w4a4"].differing == flipped and checks["w4a4"].num_samples == 40
  assert not checks["float"].integer and checks["w4a4"].integer
  with pytest.raises(ValueError, match="reference: expected the levels"):
    device_check.compare(got, {"float": ref["float"]})


def test_a_device_with_a_wrong_level_is_refused_by_name(tiny, monkeypatch):
  _, params, bb = tiny
  real = device_check.level_logits
  cpu = jax.devices("cpu")[0]
  calls = []

  def broken_on_first_call(backbone, params, ladder, inputs, device):
    """The first call plays the device under test: its w8a8 logits are scrambled."""
    out = real(backbone, params, ladder, inputs, device)
    if not calls:
      out["w8a8"] = np.random.default_rng(0).normal(size=out["w8a8"].shape)
    calls.append(device)
    return out

  monkeypatch.setattr(device_check, "level_logits", broken_on_first_call)
  with pytest.raises(device_check.DeviceMismatch,
                     match=r"w8a8: \d+ of 64 samples differ \(at most 2% may\)") as e:
    device_check.check_device(bb, params, LADDER, images(64), device=cpu, reference=cpu)
  assert "float" not in str(e.value) and "w4a4" not in str(e.value)
  assert "quee_jax.avoid_triton_gemm() before jax starts" in str(e.value)  # what to do about it


def test_the_predictor_at_its_level_agrees_with_itself_and_a_wrong_one_is_refused(monkeypatch):
  check = device_check.check_predictor("w8a8", 3, 7, 16, 5, num_inputs=64)
  assert check.level == "predictor@w8a8" and check.agreement == 1.0 and check.max_diff == 0.0
  real, calls = predictor.predict, []

  def wrong_on_first_call(*args, **kw):
    out = real(*args, **kw)
    calls.append(1)
    return 1 - out if len(calls) == 1 else out

  monkeypatch.setattr(predictor, "predict", wrong_on_first_call)
  with pytest.raises(device_check.DeviceMismatch, match=r"predictor@w8a8: \d+ of 192 samples differ"):
    device_check.check_predictor("w8a8", 3, 7, 16, 5, num_inputs=64)


def _check(level, max_diff=0.0, differing=0, wrong=(), scale=4.0, n=256):
  return device_check.LevelCheck(level, 1.0, max_diff, differing=differing, num_samples=n,
                                 scale=scale, int_dots=6, wrong_dots=wrong,
                                 integer=level != "float" and not level.endswith("@float"))


def test_the_rule_integer_dots_exact_float_within_tolerance_few_samples_differ():
  tol = device_check.FLOAT_TOLERANCE * 4.0
  # Float path: any logit beyond the tolerance fails, however few samples it moves.
  assert _check("float", max_diff=0.9 * tol).failures() == []
  assert "a float path off by" in _check("float", max_diff=1.1 * tol).failures()[0]
  # Integer level: its logits may move further (a quantizer turns last-bit float rounding into
  # a neighbouring integer), but at most 2% of the samples may change class...
  assert _check("w4a4", max_diff=10 * tol, differing=5).failures() == []  # 5 <= 2% of 256
  assert _check("w4a4", differing=6).failures() == ["6 of 256 samples differ (at most 2% may)"]
  # ...and its integer dots must be exact, bit for bit: one wrong output is enough.
  assert _check("w8a8", wrong=("[256,33]x[33,16] (1 of 4096 outputs)",)).failures() == [
      "its integer dots [256,33]x[33,16] (1 of 4096 outputs) are not exact"]
  # Predictors: probabilities; at float each within PROB_TOLERANCE.
  tol = device_check.PROB_TOLERANCE
  assert _check("predictor@float", max_diff=1.5 * tol, scale=1.0).failures()
  assert not _check("predictor@w8a8", max_diff=1.5 * tol, differing=1, scale=1.0).failures()


def test_a_wrong_integer_dot_stops_the_check_even_when_every_prediction_agrees(tiny, monkeypatch):
  """A wrong int kernel may hide behind a forward that happens to predict the same classes."""
  _, params, bb = tiny
  cpu = jax.devices("cpu")[0]
  real, calls = device_check.run_int_dots, []

  def off_by_one_on_first_call(dots, device):
    out = real(dots, device)
    if not calls:  # the device under test: one output of the attention scores is off by one
      out[1] = out[1].copy()
      out[1].flat[0] += 1
    calls.append(device)
    return out

  monkeypatch.setattr(device_check, "run_int_dots", off_by_one_on_first_call)
  with pytest.raises(device_check.DeviceMismatch, match=r"w8a8: its integer dots .* \(1 of \d+"
                     r" outputs\) are not exact") as e:
    device_check.check_device(bb, params, LADDER, images(64), device=cpu, reference=cpu)
  assert "w4a4: its integer dots" in str(e.value) and "float:" not in str(e.value)


def test_integer_dots_are_read_off_the_forward_at_its_shapes(tiny):
  _, params, bb = tiny
  dots = device_check.level_dots(bb, params, LADDER, images(8))
  assert dots["float"] == [] and dots["w8a8"] == dots["w4a4"] and len(dots["w8a8"]) == 6
  assert all(d.lhs[0] == 8 for d in dots["w8a8"])  # at the batch the check runs


def test_qwix_int4_dots_are_read_and_run_in_their_own_dtype(tiny):
  # qwix keeps 2-4 bits in int4: the check replays those dots on int4 operands (every
  # code in [-8, 7]), not on int8 ones, and they are exact.
  cfg, params, _ = tiny
  bb = q.models.backbone(cfg, "qwix")
  dots = device_check.level_dots(bb, params, "w8a8,w4a4", images(8))
  assert {(d.lhs_dtype, d.rhs_dtype) for d in dots["w8a8"]} == {("int8", "int8")}
  assert {(d.lhs_dtype, d.rhs_dtype) for d in dots["w4a4"]} == {("int4", "int4")}
  cpu = jax.devices("cpu")[0]
  assert device_check.wrong_dots(dots["w4a4"], cpu, cpu) == [None] * len(dots["w4a4"])
