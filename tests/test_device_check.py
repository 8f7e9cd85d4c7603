"""The device check: a device that computes a level unlike the CPU is refused by name."""

import jax
import numpy as np
import pytest
from conftest import images

from quee_jax.gating import predictor
from quee_jax.runtime import device_check

LADDER = "float,w8a8,w4a4"


def test_the_cpu_agrees_with_itself_on_every_level(tiny):
  _, params, bb = tiny
  checks = device_check.check_device(bb, params, LADDER, images(64))
  assert [c.level for c in checks] == ["float", "w8a8", "w4a4"]
  assert all(c.agreement == 1.0 and c.max_diff == 0.0 for c in checks)
  assert device_check.summary(checks).endswith("float 100.0%, w8a8 100.0%, w4a4 100.0%")


def test_compare_counts_flipped_predictions_per_level():
  rng = np.random.default_rng(0)
  ref = {"float": rng.normal(size=(3, 40, 5)), "w4a4": rng.normal(size=(3, 40, 5))}
  got = {"float": ref["float"] + 1e-6, "w4a4": ref["w4a4"].copy()}
  got["w4a4"][1, :10] = -got["w4a4"][1, :10]  # 10 of 120 (exit, sample) pairs: argmax moves
  flipped = (np.argmax(got["w4a4"], -1) != np.argmax(ref["w4a4"], -1)).sum()
  checks = {c.level: c for c in device_check.compare(got, ref)}
  assert checks["float"].agreement == 1.0 and checks["float"].max_diff < 1e-5
  assert checks["w4a4"].agreement == pytest.approx(1 - flipped / 120) and flipped >= 8
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
                     match=r"w8a8 agrees on \d+\.\d% of its outputs") as e:
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
  with pytest.raises(device_check.DeviceMismatch, match=r"predictor@w8a8 agrees on"):
    device_check.check_predictor("w8a8", 3, 7, 16, 5, num_inputs=64)
