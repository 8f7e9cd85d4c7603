import numpy as np
import pytest

import quee_jax as q
from quee_jax.core.table import StateTable
from quee_jax.gating import policy
from quee_jax.protocol import baselines, metrics

LADDER = ("float", "w4a4")


def tiny_family(name="switch_once", exits=(1, 2, 3)):
  # float blocks cost 0.3, w4a4 blocks 0.05; embedding 0.1; free heads.
  costs = q.CostTable(unit="bops", float_bits=16, ladder=LADDER, embed=0.1,
                      blocks=np.array([[0.3, 0.05]] * 3), heads=np.zeros(3), full_model=1.0)
  return q.build_family(name, LADDER, exits, costs)


def table_for(fam, correct):
  """A table whose states are right exactly where `correct` [S, N] says."""
  S, N = correct.shape
  labels = np.zeros(N, np.int32)
  pred = np.where(correct, 0, 1).astype(np.int32)
  feats = {k: np.full((S, N), 0.5, np.float32) for k in q.FEATURES}
  return StateTable(fam, labels, pred, correct, feats, None, {"num_classes": 2}, {})


def uniform_pred(fam, n, value=0.3):
  return np.where(fam.cand_mask[:, None, :], value, 1.0).astype(np.float32) * np.ones((1, n, 1))


def random_case(fam, n, p_right, seed):
  """A table right with probability p_right, random predictions, the table's own start rates."""
  rng = np.random.default_rng(seed)
  table = table_for(fam, rng.random((fam.num_states, n)) < p_right)
  predicted = rng.random((fam.num_states, n, len(fam.candidates))).astype(np.float32)
  return table, predicted, policy.start_errors(table)


def test_lambda_zero_is_the_full_model_even_when_cheap_paths_look_better():
  fam = tiny_family()
  table, predicted, pop = random_case(fam, 50, 0.7, seed=0)
  pop[1] = 0.0  # the cheap level even looks perfect on average
  res = policy.simulate(table, predicted, pop, np.array([0.0]))
  full = fam.chain(0)[-1]
  assert (res.exit_state == full).all()
  np.testing.assert_allclose(res.cost, 1.0)
  np.testing.assert_array_equal(res.pred[0], table.pred[full])


def test_huge_lambda_exits_at_the_first_gate_at_the_cheapest_level():
  fam = tiny_family()
  table = table_for(fam, np.ones((fam.num_states, 20), bool))
  res = policy.simulate(table, uniform_pred(fam, 20), policy.start_errors(table), np.array([1e6]))
  assert (res.exit_state == fam.find(["w4a4"])).all()
  np.testing.assert_allclose(res.cost, 0.15)


def test_an_explicit_start_level_overrides_the_population_rule():
  fam = tiny_family()
  table = table_for(fam, np.ones((fam.num_states, 20), bool))
  pop = policy.start_errors(table)
  res = policy.simulate(table, uniform_pred(fam, 20), pop, np.array([1e6, 1e6, 0.0]),
                        starts=["float", 1, "w4a4"])
  assert res.starts.tolist() == [0, 1, 1]
  assert (res.exit_state[0] == fam.find(["float"])).all()  # huge λ: the first exit, at float
  assert (res.exit_state[1] == fam.find(["w4a4"])).all()
  # λ = 0 from w4a4: the reference from a state that may still switch is the full model's
  # level, so block 1 at w4a4 and then float to the end.
  assert (res.exit_state[2] == fam.find(["w4a4", "float", "float"])).all()
  for starts, msg in ((["w8a8"] * 3, "unknown level"), ([2, 0, 0], "not start levels"),
                      ([0, 1], "one per row"), ([0.0, 1.0, 0.0], "names or indices")):
    with pytest.raises(ValueError, match=f"starts: .*{msg}"):
      policy.simulate(table, uniform_pred(fam, 20), pop, np.array([1e6, 1e6, 0.0]), starts=starts)


def test_the_operating_grid_contains_every_point_of_the_population_rule():
  # The rule picks one start level per λ, so sweeping every start level with every λ can
  # only add operating points: its curve is nowhere below the rule's.
  fam = tiny_family()
  table, predicted, pop = random_case(fam, 80, 0.6, seed=3)
  lams = policy.lambda_grid(fam, 32)
  rule = policy.simulate(table, predicted, pop, lams)
  grid_lams, grid_starts = policy.operating_grid(fam, lams)
  grid = policy.simulate(table, predicted, pop, grid_lams, starts=grid_starts)
  assert len(grid.lambdas) == len(fam.start_levels) * len(lams)
  assert sorted(set(grid.starts.tolist())) == list(fam.start_levels)
  for row, (lam, start) in enumerate(zip(rule.lambdas, rule.starts)):
    match = np.flatnonzero((grid.lambdas == lam) & (grid.starts == start))
    np.testing.assert_array_equal(grid.exit_state[match[0]], rule.exit_state[row])
  for b in metrics.BUDGETS:
    assert metrics.accuracy_at(grid.points(), b, 2) >= metrics.accuracy_at(rule.points(), b, 2)
  assert grid.points()[0]["param"] == {"lambda": 0.0, "start": "float"}


def test_known_decision():
  fam = tiny_family()
  N, G = 4, fam.num_gates
  table = table_for(fam, np.ones((fam.num_states, N), bool))
  root, two = fam.find(["float"]), fam.find(["float", "float"])
  predicted = np.full((fam.num_states, N, len(fam.candidates)), 0.9, np.float32)
  next_float, end_float = 1 + 0 * G + 1, 1 + 0 * G + 2  # float up to exit 1 / exit 2
  predicted[root, :, 0] = 0.3
  predicted[root, :, next_float] = 0.1
  predicted[root, :, end_float] = 0.1
  predicted[two, :, 0] = 0.0
  predicted[two, :, end_float] = 0.0
  pop = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # the population rates pick float
  # At the root the reference (float to the end) scores 0.1 + 0.6 lam, one more float
  # block 0.1 + τ log 2 + 0.3 lam (soft floor, τ = 0.01), EXIT 0.1 + τ softplus(20)
  # + 0 = 0.3, anything else >= 0.9. So continue iff lam < (0.2 - τ log 2) / 0.3 = 0.644.
  res = policy.simulate(table, predicted, pop, np.array([0.1, 0.6, 0.7, 1.0]))
  assert res.exit_state[:, 0].tolist() == [two, two, root, root]
  np.testing.assert_allclose(res.cost[:, 0], [0.7, 0.7, 0.4, 0.4])


def test_soft_floor_lets_samples_leave_in_order_of_predicted_advantage():
  fam = tiny_family("exit_only")
  N = 6
  table = table_for(fam, np.ones((fam.num_states, N), bool))
  root = fam.find(["float"])
  predicted = np.full((fam.num_states, N, len(fam.candidates)), 0.2, np.float32)
  # Exiting at the root is predicted better than the full path by 0, 1, ..., 5 points.
  predicted[root, :, 0] = 0.2 - 0.01 * np.arange(N)
  pop = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  lams = np.geomspace(1e-6, 1e-1, 200)
  exited = policy.simulate(table, predicted, pop, lams).exit_state == root  # [L, N]
  assert not exited[0].any() and exited[-1].all()
  assert (exited[1:] >= exited[:-1]).all()  # once gone at some λ, gone at every larger λ
  first = np.argmax(exited, axis=0)  # index of the λ at which each sample leaves
  assert (np.diff(first) <= 0).all() and first[-1] < first[0]  # more advantage, earlier
  # A hard floor makes every tied-or-better sample leave at once.
  hard = policy.simulate(table, predicted, pop, lams, tau=0.0).exit_state == root
  assert hard[0].all()


def test_ties_break_toward_more_computation():
  errors = np.array([[0.2, 0.2, 0.2]])
  dcost = np.array([[0.0, 0.5, 0.2]])
  mask = np.ones((1, 3), bool)
  assert policy.choose(errors, dcost, mask, np.array([0.0]))[0] == 1
  assert policy.choose(errors, dcost, mask, np.array([0.1]))[0] == 0


def test_bad_lambdas_raise():
  fam = tiny_family()
  table = table_for(fam, np.ones((fam.num_states, 3), bool))
  with pytest.raises(ValueError, match="lambdas"):
    policy.simulate(table, uniform_pred(fam, 3), policy.start_errors(table), np.array([-1.0]))
  with pytest.raises(ValueError, match="predicted"):
    policy.simulate(table, uniform_pred(fam, 4), policy.start_errors(table), np.array([1.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_path_oracle_is_never_below_other_methods(seed):
  fam = tiny_family()
  rng = np.random.default_rng(seed)
  N = 300
  difficulty = rng.random(N)
  depth_gain = (fam.gate[:, None] + 1) * 0.15 + np.where(fam.level == 0, 0.2, 0.0)[:, None]
  table = table_for(fam, rng.random((fam.num_states, N)) < 0.3 + depth_gain - 0.3 * difficulty)
  table.features["max_prob"] = np.clip(table.correct + rng.normal(0, 0.4, (fam.num_states, N)), 0, 1).astype(np.float32)
  oracle = baselines.path_oracle(table)
  others = baselines.static(table) + baselines.confidence_exit(table, table, 0) \
      + baselines.confidence_exit(table, table, 1)
  predicted = rng.random((fam.num_states, N, len(fam.candidates))).astype(np.float32)
  others += policy.simulate(table, predicted, policy.start_errors(table),
                            policy.lambda_grid(fam)).points()
  for p in others:
    assert metrics.accuracy_at(oracle, p["cost"], 2) >= p["accuracy"] - 1e-12, p


def test_lambda_for_budget():
  f = lambda lam: 1.0 / (1.0 + lam)
  lam = policy.lambda_for_budget(f, 0.25)
  assert f(lam) <= 0.25 and f(lam * 0.99) > 0.25
  assert policy.lambda_for_budget(f, 1.0) == 0.0
  with pytest.raises(ValueError, match="budget"):
    policy.lambda_for_budget(f, 0.0)


def test_budget_mix_spends_the_budget_across_a_jump():
  # Every sample at the dear level below λ = 1, every sample at the cheap one above.
  f = lambda lam: 1.0 if lam < 1.0 else 0.1
  mix = policy.budget_mix(f, 0.5)
  assert f(mix.lam) == 0.1 and f(mix.lam_rich) == 1.0
  # Both λ sit 1% inside their flat piece, not within rounding of the jump, where a float32
  # runtime could not tell them apart.
  assert mix.lam == pytest.approx(1.01, rel=1e-6) and mix.lam_rich == pytest.approx(1 / 1.01)
  assert (1 - mix.p_rich) * 0.1 + mix.p_rich * 1.0 == pytest.approx(0.5)
  assert policy.budget_mix(f, 1.0) == policy.BudgetMix(0.0, 0.0, 0.0)  # λ = 0 fits
  assert policy.budget_mix(lambda lam: 0.3, 0.1).p_rich == 0.0  # unreachable: cheapest alone
