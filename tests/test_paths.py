import dataclasses

import numpy as np
import pytest

import quee_jax as q

LEVELS = ["float", "w8a8", "w4a4", "w2a4", "w2a2"]


def costs(num_levels, num_blocks, num_exits):
  rng = np.random.default_rng(num_levels * 100 + num_blocks)
  return q.CostTable(unit="bops", float_bits=16, ladder=tuple(LEVELS[:num_levels]), embed=0.01,
                     blocks=rng.uniform(0.01, 0.2, (num_blocks, num_levels)),
                     heads=np.full(num_exits, 1e-3), full_model=1.0)


def family(name, num_levels=3, exits=(1, 2, 3, 4), start_levels=None):
  return q.build_family(name, LEVELS[:num_levels], exits,
                        costs(num_levels, exits[-1], len(exits)), start_levels)


CLOSED_FORMS = {
    # Q levels, G gates, S start levels.
    "switch_once": lambda Q, G, S: S * G + S * (Q - 1) * G * (G - 1) // 2,
    "quant_only": lambda Q, G, S: S * G + S * (Q - 1) * G * (G - 1) // 2,
    "constant": lambda Q, G, S: S * (1 + (G - 1) * Q),
    "exit_only": lambda Q, G, S: S * G,
}


@pytest.mark.parametrize("name", q.FAMILIES)
@pytest.mark.parametrize("num_levels,exits,start_levels", [
    (1, (1, 2, 3), None), (3, (1, 2, 3, 4), None), (4, (1, 2, 3, 4, 5, 6), None),
    (4, (2, 4, 6), None), (3, (1, 2, 3, 4), (0,)), (5, (1, 3, 5, 7), (0, 2))])
def test_state_counts_match_closed_forms(name, num_levels, exits, start_levels):
  fam = family(name, num_levels, exits, start_levels)
  num_starts = num_levels if start_levels is None else len(start_levels)
  assert fam.num_states == CLOSED_FORMS[name](num_levels, len(exits), num_starts)


def test_switch_once_default_size():
  # docs/method.md (Notation): 4 levels and 6 blocks give 204 states (block evaluations per sample).
  assert family("switch_once", 4, (1, 2, 3, 4, 5, 6)).num_states == 204


@pytest.mark.parametrize("name", q.FAMILIES)
def test_histories_follow_the_family_rule(name):
  fam = family(name, 3, (1, 2, 4, 5))
  seen = set()
  for s in range(fam.num_states):
    hist = [x for x in fam.history[s] if x >= 0]
    assert len(hist) == fam.exits[fam.gate[s]]
    seen.add(tuple(hist))
    changes = [i for i in range(1, len(hist)) if hist[i] != hist[i - 1]]
    assert all(c in fam.exits for c in changes)  # levels change only at gates
    if name in ("switch_once", "quant_only"):
      assert len(changes) <= 1
    elif name == "constant":
      assert changes in ([], [fam.exits[0]])
    else:
      assert changes == []
    assert fam.switched[s] == bool(changes)
    assert fam.start_level[s] == hist[0] and fam.level[s] == hist[-1]
    p = fam.parent[s]
    if p >= 0:
      assert fam.gate[p] == fam.gate[s] - 1
      assert list(fam.history[p][:fam.exits[fam.gate[p]]]) == hist[:fam.exits[fam.gate[p]]]
    else:
      assert fam.gate[s] == 0
  assert len(seen) == fam.num_states  # every history once
  # Topological order: parents first; within a gate grouped by segment level.
  assert all(fam.parent[s] < s for s in range(fam.num_states))
  for g in range(fam.num_gates):
    levels = fam.level[fam.states_at(g)]
    assert list(levels) == sorted(levels)


def test_cumulative_cost():
  fam = family("switch_once", 3, (1, 2, 4, 5))
  c = fam.costs
  s = fam.find(["w8a8", "w8a8", "w4a4", "w4a4"])
  want = c.embed + c.blocks[0, 1] + c.blocks[1, 1] + c.blocks[2, 2] + c.blocks[3, 2] + c.heads[:3].sum()
  np.testing.assert_allclose(fam.cost[s], want)
  assert fam.path(s) == [fam.find(["w8a8"]), fam.find(["w8a8", "w8a8"]), s]


def test_candidates_switch_once():
  fam = family("switch_once", 3, (1, 2, 4, 5))
  G = fam.num_gates
  root = fam.find(["float"])
  slot = lambda lvl, m: 1 + lvl * G + m
  assert fam.cand_mask[root, q.EXIT] and fam.cand_state[root, q.EXIT] == root
  assert fam.cand_cost[root, q.EXIT] == 0
  # From the float root, continue at w4a4 up to exit 2 (block 4): blocks 2..4 at w4a4.
  target = fam.find(["float", "w4a4", "w4a4", "w4a4"])
  assert fam.cand_state[root, slot(2, 2)] == target
  c = fam.costs
  np.testing.assert_allclose(fam.cand_cost[root, slot(2, 2)],
                             c.blocks[1:4, 2].sum() + c.heads[1] + c.heads[2])
  assert fam.cand_mask[root].sum() == 1 + 3 * 3  # EXIT + 3 levels x 3 later exits
  assert not fam.cand_mask[root, slot(0, 0)]  # no exit at or before the current gate
  # After a switch only the current level continues.
  switched = fam.find(["float", "w4a4"])
  assert [fam.candidates[k] for k in np.flatnonzero(fam.cand_mask[switched])] == [None, (2, 2), (2, 3)]
  # The last gate only exits.
  last = fam.states_at(G - 1)
  assert fam.cand_mask[last].sum(axis=1).tolist() == [1] * len(last)
  # Every candidate's cost is its target's cost minus the state's.
  valid = fam.cand_mask
  np.testing.assert_allclose(fam.cand_cost[valid],
                             (fam.cost[fam.cand_state] - fam.cost[:, None])[valid])
  assert (fam.cand_cost[valid] >= 0).all()


def test_candidates_quant_only_and_exit_only():
  fam = family("quant_only", 3, (1, 2, 3))
  G = fam.num_gates
  for s in range(fam.num_states):
    slots = [fam.candidates[k] for k in np.flatnonzero(fam.cand_mask[s])]
    if fam.gate[s] < G - 1:
      assert None not in slots and all(m == G - 1 for _, m in slots)
    else:
      assert slots == [None]
  fam = family("exit_only", 3, (1, 2, 3))
  for s in range(fam.num_states):
    slots = [fam.candidates[k] for k in np.flatnonzero(fam.cand_mask[s])]
    assert all(c is None or c[0] == fam.level[s] for c in slots)


def test_spec_round_trip():
  fam = family("constant", 3, (1, 3, 4), (0, 1))
  again = q.core.paths.from_spec(fam.spec())
  for k in ("gate", "parent", "level", "history", "cost", "cand_state", "cand_cost"):
    np.testing.assert_array_equal(getattr(fam, k), getattr(again, k))


def test_bad_arguments_raise():
  c = costs(3, 4, 4)
  with pytest.raises(ValueError, match="family"):
    q.build_family("switch_twice", LEVELS[:3], (1, 2, 3, 4), c)
  with pytest.raises(ValueError, match="start_levels"):
    q.build_family("switch_once", LEVELS[:3], (1, 2, 3, 4), c, (3,))
  with pytest.raises(ValueError, match="start_levels"):
    q.build_family("switch_once", LEVELS[:3], (1, 2, 3, 4), c, ())
  with pytest.raises(ValueError, match="ladder"):
    q.build_family("switch_once", ["float", "w4a4", "w8a8"], (1, 2, 3, 4), c)
  with pytest.raises(ValueError, match="exits"):
    q.build_family("switch_once", LEVELS[:3], (1, 2, 3), c)
  with pytest.raises(ValueError, match="levels"):
    family("switch_once").find(["float", "w3a3"])


def test_children_and_gate_overhead():
  fam = family("switch_once", 3, (1, 2, 4, 5))
  for s in range(fam.num_states):
    for lvl in range(3):
      c = fam.child[s, lvl]
      if c >= 0:
        assert fam.parent[c] == s and fam.level[c] == lvl and fam.gate[c] == fam.gate[s] + 1
  switched = fam.find(["float", "w4a4"])
  assert (fam.child[switched] >= 0).tolist() == [False, False, True]
  heavier = fam.with_gate_overhead([0.01, 0.01, 0.01, 0.0])
  np.testing.assert_allclose(heavier.cost - fam.cost, 0.01 * (heavier.gate + 1).clip(max=3))
  assert q.core.paths.from_spec(heavier.spec()).cost.tolist() == heavier.cost.tolist()
  with pytest.raises(ValueError, match="gate_overhead"):
    fam.with_gate_overhead([0.1, 0.1])


@pytest.mark.parametrize("name", q.FAMILIES)
def test_reference_is_the_full_models_path_and_survives_recosting(name):
  per_block = np.random.default_rng(0).uniform(0.05, 0.2, 4)
  bops_like = dataclasses.replace(costs(3, 4, 4), blocks=np.outer(per_block, [1.0, 0.25, 1 / 16]))
  fam = q.build_family(name, LEVELS[:3], (1, 2, 3, 4), bops_like)
  dearest = np.argmax(np.where(fam.cand_mask, fam.cand_cost, -np.inf), axis=1)
  np.testing.assert_array_equal(fam.reference, dearest)
  assert fam.cand_mask[np.arange(fam.num_states), fam.reference].all()
  # Under a cost model where the top level is the cheapest, the full model is still float.
  timed = fam.with_costs(dataclasses.replace(bops_like, blocks=bops_like.blocks[:, ::-1]))
  assert timed.top == fam.top == 0
  np.testing.assert_array_equal(timed.reference, fam.reference)
  assert q.core.paths.from_spec(timed.spec()).top == 0
