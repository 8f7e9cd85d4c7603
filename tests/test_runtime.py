"""The adaptive runtime: it decides as the simulated policy does, compiles a bounded
number of programs, and refuses bad input before running anything."""

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import family, images, labels

import quee_jax as q
from quee_jax import protocol, runtime
from quee_jax.gating import predictor
from quee_jax.protocol import baselines
from quee_jax.gating import policy
from quee_jax.runtime import program

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
                          max_batch=64, min_chunk=8)
  return x, tables, fitted, runner


RUN_LANE = program.run_lane  # unwrapped, whatever a test has patched in


def limit_traces(monkeypatch, n: int) -> None:
  """Runners made from here on (in this test) may trace their lane program n times in all."""
  chex.clear_trace_counter()
  monkeypatch.setattr(program, "run_lane", chex.assert_max_traces(RUN_LANE, n=n))


def simulated(fitted, table, lam):
  res = fitted.simulate(table, "test", np.array([lam]))
  return res.exit_state[0], res.pred[0]


@pytest.mark.parametrize("max_chunk", [None, 16])
def test_runner_equals_the_simulated_policy_on_every_sample(setup, tiny, max_chunk):
  x, tables, fitted, runner = setup
  if max_chunk:  # groups above 16 rows run as a loop of 16-row chunks and the rest
    runner = runtime.Runner(tiny[2], tiny[1], runner.gating, input_shape=x["test"].shape[1:],
                            max_batch=64, min_chunk=8, max_chunk=max_chunk)
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
    # Rows needed: every gate each sample reached; padding: under min_chunk per group.
    assert out.rows_needed == (fam.gate[state] + 1).sum()
    groups = fam.num_gates * len(fam.ladder) * -(-len(state) // runner.max_batch)
    assert out.rows_needed <= out.rows_computed < out.rows_needed + groups * runner.min_chunk
  assert len(costs) >= 3  # the λ above really take different paths


def test_a_sample_gets_the_same_result_alone_and_in_a_batch(setup):
  x, _, _, runner = setup
  batch = images(1000, seed=9)
  lam = np.random.default_rng(2).choice([1e-3, 0.01, 0.2], len(batch))
  want = runner.classify(batch, lam)  # 1,000 samples: 16 calls of a lane of 64
  for i in (0, 77, 500, 999):
    got = runner.classify(batch[i:i + 1], lam[i])  # a lane of min_chunk, one live row
    assert (got.exit_state[0], got.pred[0]) == (want.exit_state[i], want.pred[i]), i
  part = runner.classify(batch[13:50], lam[13:50])  # a lane of 64, 27 rows of padding
  np.testing.assert_array_equal(part.exit_state, want.exit_state[13:50])
  np.testing.assert_array_equal(part.pred, want.pred[13:50])
  assert len(set(want.exit_state.tolist())) >= 3  # the samples took several paths


def test_per_sample_lambda_mixes_two_policies(setup):
  x, tables, fitted, runner = setup
  coin = np.random.default_rng(0).random(len(x["test"])) < 0.5
  out = runner.classify(x["test"], np.where(coin, 1e-3, 0.2))
  for lam, rows in ((1e-3, coin), (0.2, ~coin)):
    state, _ = simulated(fitted, tables["test"], lam)
    np.testing.assert_array_equal(out.exit_state[rows], state[rows])


def test_budget_mode_points_run_as_simulated(setup):
  """Budget mode's two λ per budget (a per-sample coin between them) decide on the device as
  in the simulation: neither sits within float32 rounding of a jump of the cal curve."""
  x, tables, fitted, runner = setup
  rng = np.random.default_rng(4)
  for budget in (0.7, 0.5, 0.25):
    point = protocol.budget_point(fitted, tables["cal"], budget)
    lam = np.where(rng.random(len(x["test"])) < point.mix.p_rich, point.mix.lam_rich,
                   point.mix.lam)
    out = runner.classify(x["test"], lam, point.start)
    for value in (point.mix.lam, point.mix.lam_rich):
      rows = lam == value
      res = fitted.simulate(tables["test"], "test", [value], [point.start])
      np.testing.assert_array_equal(out.exit_state[rows], res.exit_state[0][rows])


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


def test_confidence_exits_and_static_levels_run_as_the_baselines_count_them(setup):
  x, tables, fitted, runner = setup
  fam, test = runner.family, tables["test"]
  plain = fam.with_gate_overhead(np.zeros(fam.num_gates))  # no predictor runs
  t = {k: v.restrict(plain) for k, v in tables.items()}
  rows = np.arange(test.num_samples)
  for lv in range(len(fam.ladder)):
    points = baselines.confidence_exit(t["fit"], t["test"], lv)
    for p in points[::6]:
      out = runner.classify_confidence(x["test"], p["param"]["level"], p["param"]["thresholds"])
      want = baselines.confidence_states_at(t["test"], p["param"])
      np.testing.assert_array_equal(out.exit_state, want, err_msg=str(p["param"]))
      np.testing.assert_array_equal(out.pred, t["test"].pred[want, rows])
      assert out.cost.mean() == pytest.approx(p["cost"]) and (out.levels[:, 0] == lv).all()
    static = runner.classify_confidence(x["test"], fam.ladder[lv])
    assert (static.exit_state == fam.chain(lv)[-1]).all()
  # Per sample: a mix of two configurations at two levels, as the naive budget mode runs them.
  a, b = (baselines.confidence_exit(t["fit"], t["test"], lv)[10]["param"] for lv in (0, 1))
  coin = np.random.default_rng(3).random(len(rows)) < 0.5
  out = runner.classify_confidence(x["test"], np.where(coin, 1, 0),
                                   np.where(coin[:, None], b["thresholds"], a["thresholds"]))
  want = np.where(coin, baselines.confidence_states_at(t["test"], b),
                  baselines.confidence_states_at(t["test"], a))
  np.testing.assert_array_equal(out.exit_state, want)
  with pytest.raises(ValueError, match="thresholds: expected 2 numbers"):
    runner.classify_confidence(x["test"], 0, [0.5])
  with pytest.raises(ValueError, match="level: unknown level"):
    runner.classify_confidence(x["test"], "w3a3")


def test_one_transfer_back_per_call_and_nothing_implicit(setup, monkeypatch):
  """The whole gating loop stays on the device: a classify call fetches its outputs once,
  and no implicit device-to-host transfer happens (jax's transfer guard would raise)."""
  x, _, _, runner = setup
  fetches = []
  real = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda a: fetches.append(1) or real(a))
  runner.classify(x["test"][:64], 0.01)  # compiles outside the guard
  fetches.clear()
  with jax.transfer_guard_device_to_host("disallow"):
    for lam in (0.0, 0.01, 0.2):
      runner.classify(x["test"][:64], lam)  # one lane
    runner.classify(x["test"], 0.01)  # four calls of a lane, still one fetch
  assert len(fetches) == 4


def test_chunk_sizes_never_exceed_max_chunk():
  assert program.chunk_sizes(64, 8) == (64, 32, 16, 8)
  assert program.chunk_sizes(20, 8) == (16, 8)  # 3 units of 8 cover a lane of 20
  assert program.chunk_sizes(64, 8, 48) == (32, 16, 8)  # rounded down to a power of two
  assert program.chunk_sizes(64, 16, 24) == (16,)
  assert program.chunk_sizes(16, 8, 256) == (16, 8)  # never above the lane


def test_a_second_batch_of_the_same_shape_compiles_nothing(setup, tiny, monkeypatch):
  x, _, _, shared = setup
  limit_traces(monkeypatch, 2)  # lanes of 64 and of 8 samples: one trace each
  # Chunk bodies, compiled into those two programs: gates x levels x chunk sizes at most
  # (sizes 64, 32, 16, 8 in a lane of 64; 8 in a lane of 8), whatever the data.
  fam = shared.family
  bodies = fam.num_gates * len(fam.ladder) * (len(program.chunk_sizes(64, 8)) + 1)
  monkeypatch.setattr(program, "chunk", chex.assert_max_traces(program.chunk, n=bodies))
  runner = runtime.Runner(tiny[2], tiny[1], shared.gating,
                          input_shape=x["test"].shape[1:], max_batch=64, min_chunk=8)
  for lam in LAMBDAS:  # one trace too many raises AssertionError
    runner.classify(x["test"][:192], lam)
    runner.classify(x["test"][:200], lam)  # the last 8 in a call of 64 as well
    runner.classify(x["test"][5:10], lam)  # a lane of 8
  assert set(runner.compile_s) == {(64, "quee"), (8, "quee")}
  assert all(s > 0 for s in runner.compile_s.values())


def test_the_decision_is_one_function_for_numpy_and_jax(setup):
  """policy.step run by numpy (the simulation) and by jax.numpy in float32 (the runtime's
  program) decides alike on every (state, sample) of a real table."""
  _, tables, fitted, runner = setup
  fam = fitted.family
  predicted = fitted.predicted["test"]  # [S, N, C]
  S, N, _ = predicted.shape
  cur = np.repeat(np.arange(S)[:, None], N, axis=1)
  dec = jax.tree.map(jnp.asarray, runner.consts.decision)
  step = jax.jit(lambda c, e, l: policy.step(dec, c, e, l, fitted.tau, xp=jnp))
  for lam in LAMBDAS:
    lam = np.full((S, N), lam)
    want = policy.step(fam, cur, predicted, lam, fitted.tau)
    got = jax.device_get(step(cur, predicted, lam))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


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
                          max_batch=64, min_chunk=8)
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
  for kw, msg in (({"max_chunk": 4}, "max_chunk: expected at least min_chunk 8"),
                  ({"min_chunk": 0}, "min_chunk: expected a positive int")):
    with pytest.raises(ValueError, match=msg):
      runtime.Runner(bb, params, gating, input_shape=good.shape[1:], **{"min_chunk": 8, **kw})
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
                     max_batch=32, min_chunk=8, devices=jax.local_devices()[:1])
two = runtime.Runner(tiny[2], params, gating, input_shape=x["test"].shape[1:],
                     max_batch=32, min_chunk=8)
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
