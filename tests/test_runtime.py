"""The adaptive runtime: it decides as the simulated policy does, compiles a bounded
number of programs, and refuses bad input before running anything."""

import dataclasses
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from conftest import family, images, labels

import quee_jax as q
from quee_jax import protocol, runtime
from quee_jax.gating import predictor
from quee_jax.runtime import stage

LAMBDAS = (0.0, 1e-4, 1e-3, 0.01, 0.05, 0.2, 1e3)
CFG = protocol.EvalConfig(seeds=(0,), min_cluster=20, max_clusters=8, variants=("quee",),
                          predictor=predictor.PredictorConfig(epochs=8, batch_size=64))


def make_fitted(tiny, ladder="float,w4a4", n=(400, 200, 200), inputs=images):
  """Tables of a random tiny model on random inputs (`inputs(n, seed=)`), QuEE fitted on them."""
  cfg, params, bb = tiny
  fam = family(bb, params, ladder, inputs=inputs(1))
  x = {k: inputs(m, seed=i) for i, (k, m) in enumerate(zip(("fit", "cal", "test"), n))}
  tables = {}
  for i, k in enumerate(x):
    t = q.collect_table(bb, params, fam, x[k], labels(len(x[k]), seed=10 + i), batch_size=100,
                        progress=False)
    # Labels the full model gets right 60% of the time, so errors differ between paths.
    top = t.pred[fam.chain(0)[-1]]
    y = np.where(np.random.default_rng(i).random(len(top)) < 0.6, top, t.labels).astype(np.int32)
    tables[k] = dataclasses.replace(t, labels=y, correct=t.pred == y[None])
  fitted = protocol.fit_variant(tables, "quee", seed=0, cfg=CFG)
  return x, tables, fitted


@pytest.fixture(scope="module")
def setup(tiny):
  x, tables, fitted = make_fitted(tiny)
  cfg, params, bb = tiny
  gating = runtime.gating_from_fitted(fitted, CFG.predictor.level)
  runner = runtime.Runner(bb, params, gating, input_shape=x["test"].shape[1:],
                          max_batch=64, min_bucket=8)
  return x, tables, fitted, runner


PROGRAM = stage.program  # unwrapped, whatever a test has patched in


def limit_traces(monkeypatch, n: int) -> None:
  """Runners made from here on (in this test) may trace stage programs n times in all."""
  chex.clear_trace_counter()
  monkeypatch.setattr(stage, "program", chex.assert_max_traces(PROGRAM, n=n))


def simulated(fitted, table, lam):
  res = fitted.simulate(table, "test", np.array([lam]))
  return res.exit_state[0], res.pred[0]


def test_runner_equals_the_simulated_policy_on_every_sample(setup):
  x, tables, fitted, runner = setup
  costs = set()
  for lam in LAMBDAS:
    out = runner.classify(x["test"], lam)
    state, pred = simulated(fitted, tables["test"], lam)
    np.testing.assert_array_equal(out.exit_state, state, err_msg=f"lambda {lam}")
    np.testing.assert_array_equal(out.pred, pred, err_msg=f"lambda {lam}")
    fam = runner.family
    np.testing.assert_array_equal(out.exit_gate, fam.gate[state])
    np.testing.assert_array_equal(out.levels, fam.history[state])
    costs.add(round(float(out.cost.mean()), 6))
  assert len(costs) >= 3  # the λ above really take different paths


def test_lanes_in_flight_do_not_change_decisions(setup, tiny):
  x, _, _, runner = setup  # 200 samples: four lanes of at most 64
  lam = np.random.default_rng(2).choice([1e-3, 0.01, 0.2], len(x["test"]))
  want = runner.classify(x["test"], lam)
  for k in (1, 3, 8):
    other = runtime.Runner(tiny[2], tiny[1], runner.gating, lanes_per_device=k,
                           input_shape=x["test"].shape[1:], max_batch=64, min_bucket=8)
    got = other.classify(x["test"], lam)
    np.testing.assert_array_equal(got.exit_state, want.exit_state, err_msg=f"{k} lanes")
    np.testing.assert_array_equal(got.pred, want.pred, err_msg=f"{k} lanes")
  with pytest.raises(ValueError, match="lanes_per_device"):
    runtime.Runner(tiny[2], tiny[1], runner.gating, lanes_per_device=0,
                   input_shape=x["test"].shape[1:])


def test_per_sample_lambda_mixes_two_policies(setup):
  x, tables, fitted, runner = setup
  coin = np.random.default_rng(0).random(len(x["test"])) < 0.5
  out = runner.classify(x["test"], np.where(coin, 1e-3, 0.2))
  for lam, rows in ((1e-3, coin), (0.2, ~coin)):
    state, _ = simulated(fitted, tables["test"], lam)
    np.testing.assert_array_equal(out.exit_state[rows], state[rows])


def test_explicit_start_levels_per_sample_equal_the_simulated_policy(setup):
  x, tables, fitted, runner = setup
  start = np.random.default_rng(1).integers(0, 2, len(x["test"]))  # float or w4a4, per sample
  for lam in (1e-3, 0.2):
    out = runner.classify(x["test"], lam, start)
    res = fitted.simulate(tables["test"], "test", [lam, lam], [0, 1])
    want = np.where(start == 0, res.exit_state[0], res.exit_state[1])
    np.testing.assert_array_equal(out.exit_state, want, err_msg=f"lambda {lam}")
    np.testing.assert_array_equal(out.levels[:, 0], start)  # block 1 ran where it was told
  named = runner.classify(x["test"], 0.2, "w4a4")
  np.testing.assert_array_equal(named.exit_state, runner.classify(x["test"], 0.2, 1).exit_state)


def test_compilations_are_bounded_by_gates_levels_and_buckets(setup, tiny, monkeypatch):
  x, _, _, shared = setup
  fam = shared.family
  limit_traces(monkeypatch, fam.num_gates * len(fam.ladder) * len(shared.buckets))
  runner = runtime.Runner(tiny[2], tiny[1], shared.gating,
                          input_shape=x["test"].shape[1:], max_batch=64, min_bucket=8)
  for n in (200, 37, 5, 1):  # every group size; one trace too many raises AssertionError
    for lam in LAMBDAS:
      runner.classify(x["test"][:n], lam)


def test_a_second_batch_of_the_same_shape_compiles_nothing(setup, tiny, monkeypatch):
  x, _, _, shared = setup
  limit_traces(monkeypatch, 0)
  runner = runtime.Runner(tiny[2], tiny[1], shared.gating,
                          input_shape=x["test"].shape[1:], max_batch=64, min_bucket=8)
  data = x["test"][:192]  # three passes of max_batch
  chex.disable_asserts()  # the first batches compile what they need
  try:
    for lam in LAMBDAS:
      runner.classify(data, lam)
  finally:
    chex.enable_asserts()
  chex.clear_trace_counter()
  for lam in LAMBDAS:  # four times the batches, the same passes: a trace raises AssertionError
    runner.classify(np.concatenate([data] * 4), lam)


def test_latency_cost_model_is_measured_and_decides_with_the_same_predictors(setup):
  x, tables, fitted, runner = setup
  model = runtime.latency_model(runner, reps=2)
  lat, fam = model.costs, runner.family
  assert lat.unit == "seconds" and lat.blocks.shape == (fam.num_blocks, len(fam.ladder))
  assert (lat.blocks > 0).all() and (lat.heads > 0).all() and lat.full_model > 0
  assert model.pairs == runtime.latency.MIN_PAIRS  # a spread needs a few pairs
  assert model.spread.shape == model.floored.shape == lat.blocks.shape
  assert (model.spread >= 0).all() and model.heads_spread.shape == lat.heads.shape
  timed = runner.with_costs(lat)
  assert timed.family.num_states == fam.num_states
  lat_fitted = dataclasses.replace(fitted, family=timed.family)
  for lam in (0.0, 0.01, 0.3):
    out = timed.classify(x["test"], lam)
    state, _ = simulated(lat_fitted, tables["test"], lam)
    np.testing.assert_array_equal(out.exit_state, state)


def test_latency_block_times_are_positive_even_when_the_measured_difference_is_not(setup):
  """Under load the program with blocks can time faster than the one without: each block is
  charged the floor then, never 0 or less, and the spread says how noisy the pairs were."""
  runner = setup[3]
  fam = runner.family
  rng = np.random.default_rng(0)
  calls = []

  def timer(gate, level, blocks):
    calls.append((gate, level, blocks))
    head = 1e-4 * (gate + 1)
    # level 0's blocks come out slower than nothing (a negative difference); the others cost
    # 1e-5 per block, with noise.
    block = -5e-6 if level == 0 else 1e-5 * (level + 1)
    n = fam.exits[gate] - ((0,) + fam.exits)[gate]
    return head + (n * block if blocks else 0.0) + rng.normal(scale=1e-7)

  model = runtime.latency_model(runner, reps=4, timer=timer)
  lat, frac = model.costs, runtime.latency.MIN_BLOCK_FRACTION
  assert (lat.blocks > 0).all() and lat.full_model > 0
  assert model.floored[:, 0].all() and not model.floored[:, 1:].any()
  bounds = (0,) + fam.exits
  for g in range(fam.num_gates):  # the floor: a stated fraction of the gate's head program
    seg = slice(bounds[g], bounds[g + 1])
    np.testing.assert_allclose(lat.blocks[seg, 0] * lat.full_model, frac * 1e-4 * (g + 1),
                               rtol=1e-2)
    np.testing.assert_allclose(lat.blocks[seg, 1:] * lat.full_model,
                               np.broadcast_to(1e-5 * np.arange(2, len(fam.ladder) + 1),
                                               (bounds[g + 1] - bounds[g], len(fam.ladder) - 1)),
                               rtol=0.1)
  assert ((model.spread > 0) & (model.spread < 1e-2)).all()
  # Interleaved: with and without alternate, so load hits both sides alike.
  firsts = [calls[i][2] for i in range(0, 8, 2)]
  assert firsts == [False, True, False, True] and len(calls) == 2 * 4 * fam.num_gates * len(fam.ladder)
  runner.with_costs(lat)  # a cost table the runner takes
  with pytest.raises(ValueError, match="reps: expected a positive int"):
    runtime.latency_model(runner, reps=0, timer=timer)


def test_bad_input_is_refused_before_any_compute(setup, tiny, monkeypatch):
  x, tables, fitted, shared = setup
  cfg, params, bb = tiny
  limit_traces(monkeypatch, 0)  # a program traced for bad input raises AssertionError
  runner = runtime.Runner(bb, params, shared.gating, input_shape=x["test"].shape[1:],
                          max_batch=64, min_bucket=8)
  good = x["test"][:10]
  cases = [
      (good[:, :4], "images: expected shape"),
      (good.astype(np.float64), "images: expected float32"),
      ((good * 255).astype(np.uint8), "images: expected float32"),
      (np.where(np.arange(10)[:, None, None, None] == 3, np.nan, good).astype(np.float32),
       "1 image"),
  ]
  for bad, msg in cases:
    with pytest.raises(ValueError, match=msg):
      runner.classify(bad, 0.1)
  for lam in (-0.1, np.nan, np.ones(3), "abc", None):
    with pytest.raises(ValueError, match="lam"):
      runner.classify(good, lam)
  for start, msg in (("w2a2", "unknown level"), (5, "not start levels"),
                     (np.zeros(3, int), "one per"), (0.5, "names or indices")):
    with pytest.raises(ValueError, match=f"start: .*{msg}"):
      runner.classify(good, 0.1, start)
  gating = runner.gating
  other = family(bb, params, "float,w8a8,w4a4")
  wrong = dataclasses.replace(gating, family=other)  # predictors sized for two levels
  with pytest.raises(ValueError, match="gating: predictor"):
    runtime.Runner(bb, params, wrong, input_shape=good.shape[1:])


def test_the_predictor_level_is_parsed_once_when_the_gating_is_made(setup):
  _, _, fitted, _ = setup
  gating = runtime.gating_from_fitted(fitted, " W8A8 ")
  assert isinstance(gating.predictor_level, q.Level) and gating.predictor_level == "w8a8"
  assert dataclasses.replace(gating, tau=0.5).predictor_level is gating.predictor_level
  with pytest.raises(ValueError, match="predictor_level: expected a level name"):
    runtime.gating_from_fitted(fitted, "w9a9")


SHARDED = """
import jax, numpy as np
from test_runtime import make_fitted
from conftest import TINY
import quee_jax as q
from quee_jax import runtime
from quee_jax import protocol
params = q.vit.init(jax.random.key(0), TINY)
tiny = (TINY, params, q.vit.backbone(TINY))
x, tables, fitted = make_fitted(tiny, n=(400, 100, 100))
gating = runtime.gating_from_fitted(fitted, "w8a8")
one = runtime.Runner(tiny[2], params, gating, input_shape=x["test"].shape[1:],
                     max_batch=32, min_bucket=8, devices=jax.local_devices()[:1])
two = runtime.Runner(tiny[2], params, gating, input_shape=x["test"].shape[1:],
                     max_batch=32, min_bucket=8)
assert len(two.devices) == 2
for lam in (0.0, 0.01, 0.2):
  a, b = one.classify(x["test"], lam), two.classify(x["test"], lam)
  assert (a.exit_state == b.exit_state).all() and (a.pred == b.pred).all(), lam
print("ok")
"""


def test_lanes_over_two_devices_give_the_same_results():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  here = os.path.dirname(os.path.abspath(__file__))
  out = subprocess.run([sys.executable, "-c", SHARDED], cwd=here, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
