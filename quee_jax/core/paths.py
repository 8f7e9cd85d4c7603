"""Path families: which precision histories exist, as a trie of states.

A state at gate g is the level history (one level per block) that produced the
hidden state at exit g; it is its parent state (at gate g-1) plus one segment of
blocks run at one level. Levels change only at gates, where features exist.
At a state the candidates are EXIT, or "continue at level q up to exit m" for
every (q, m) the family allows; each has an additional counted cost ΔC.

All states share one padded candidate layout: slot 0 is EXIT, slot
1 + q * G + m is (level q, exit m); a mask removes what a state cannot take.
That lets one `vmap` evaluate every gate later.

Families (docs/method.md, Notation):
  switch_once  start at any start level; switch once, at any gate, to any other
               level, and keep it (default).
  constant     the level may change only at the first gate, then is kept.
  exit_only    no level change: plain early exiting (one chain per start level).
  quant_only   switch_once histories, but no early exit: only the level choice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import validate_exits
from quee_jax.core.cost import CostTable

EXIT = 0  # candidate slot of "exit now"

# name -> (when the level may change, whether early exits are allowed)
_RULES = {
    "switch_once": ("once", True),
    "constant": ("first_gate", True),
    "exit_only": ("never", True),
    "quant_only": ("once", False),
}
FAMILIES = tuple(_RULES)


@dataclasses.dataclass(frozen=True, eq=False)
class PathFamily:
  """A family's trie of states with costs and candidates (numpy arrays, S states).

  States are ordered by gate, and within a gate by (segment level, parent), so
  the children that run their last segment at one level are contiguous.

  Attributes:
    name: family name (see FAMILIES).
    ladder: the levels (`precision.Level`, each its own name); a level index q refers to
      ladder[q].
    exits: block counts of the gates (exit positions).
    start_levels: level indices a path may start at.
    costs: the normalized cost table the costs below come from.
    top: the level of the full model (by default the costs' most expensive);
      it stays when the family is re-costed, e.g. by measured latency.
    gate: [S] gate index of each state.
    parent: [S] parent state index, -1 for roots (computed from the embedding).
    level: [S] level index of the state's last segment.
    start_level: [S] level index of the first segment.
    switched: [S] whether the history contains a level change.
    history: [S, num_blocks] level index per block, -1 beyond the state's depth.
    cost: [S] cumulative cost: embedding, blocks, and the exit head (plus the
      gate overhead, e.g. a predictor) of every gate passed: each gate's head
      runs to take its decision.
    gate_overhead: [G] cost charged at each gate besides its exit head.
    child: [S, Q] the state one segment on at level q, -1 where not allowed.
    candidates: per slot, None for EXIT or (level index, exit index).
    cand_state: [S, C] state each candidate's exit reads (itself for EXIT); -1 invalid.
    cand_cost: [S, C] additional cost ΔC of each candidate (0 where invalid).
    cand_mask: [S, C] which candidates the state may take.
    reference: [S] the slot of the path the full model would take from the
      state: on at the top level if the state may change level (else at its
      own) to the last exit; EXIT at the last gate. The policy's floor.
  """

  name: str
  ladder: precision.Ladder
  exits: tuple[int, ...]
  start_levels: tuple[int, ...]
  costs: CostTable
  top: int
  gate_overhead: np.ndarray
  gate: np.ndarray
  parent: np.ndarray
  level: np.ndarray
  start_level: np.ndarray
  switched: np.ndarray
  history: np.ndarray
  cost: np.ndarray
  child: np.ndarray
  candidates: tuple
  cand_state: np.ndarray
  cand_cost: np.ndarray
  cand_mask: np.ndarray
  reference: np.ndarray

  @property
  def num_states(self) -> int:
    return len(self.gate)

  @property
  def num_gates(self) -> int:
    return len(self.exits)

  @property
  def num_blocks(self) -> int:
    return self.exits[-1]

  def states_at(self, gate: int) -> np.ndarray:
    return np.flatnonzero(self.gate == gate)

  def path(self, state: int) -> list[int]:
    """States from the root to `state`, inclusive."""
    out = [state]
    while self.parent[out[-1]] >= 0:
      out.append(int(self.parent[out[-1]]))
    return out[::-1]

  def chain(self, level: int) -> np.ndarray:
    """[G] states of the constant-level path at `level` (an index), one per gate."""
    return np.array([self.find([self.ladder[level]] * e) for e in self.exits])

  def block_levels(self, state: int) -> list[str]:
    """Level name of every block the state has run."""
    return [self.ladder[q] for q in self.history[state] if q >= 0]

  @functools.cached_property
  def index(self) -> dict[tuple[int, ...], int]:
    """State of each history (a tuple of level indices, one per block run)."""
    return {tuple(int(q) for q in h[h >= 0]): s for s, h in enumerate(self.history)}

  def find(self, levels: Sequence[str]) -> int:
    """Index of the state whose per-block level history is `levels` (names)."""
    try:
      key = tuple(self.ladder.index(name) for name in levels)
    except ValueError:
      raise ValueError(f"levels: names must come from the ladder {self.ladder}, got {levels}")
    if key not in self.index:
      raise ValueError(f"levels: no state of family {self.name!r} has history {list(levels)}")
    return self.index[key]

  def rows_of(self, other: "PathFamily") -> np.ndarray:
    """[other's S] this family's state with the same history as each of `other`'s states
    (`other` may run on some of this family's levels, `on_levels`)."""
    unknown = sorted(set(other.ladder) - set(self.ladder))
    if unknown:
      raise ValueError(f"family: ladder {list(other.ladder)} has levels {unknown} that"
                       f" {list(self.ladder)} lacks")
    to_self = [self.ladder.index(q) for q in other.ladder]
    try:
      return np.array([self.index[tuple(to_self[q] for q in key)] for key in other.index])
    except KeyError as e:
      raise ValueError(f"family: {other.name!r} has a history the {self.name!r} family"
                       f" lacks: {[self.ladder[q] for q in e.args[0]]}") from None

  def on_levels(self, levels: precision.Ladder | Sequence[str]) -> "PathFamily":
    """The same family over some of its levels, the full model's among them: the states
    of this family whose every block runs at one of `levels` (a table keeps them with
    `StateTable.restrict`), at the same costs."""
    levels = precision.parse_ladder(levels)
    top = self.ladder[self.top]
    if top not in levels:
      raise ValueError(f"levels: expected the full model's level {top!r} among {list(levels)}")
    costs = self.costs.select(levels)
    starts = [levels.index(self.ladder[q]) for q in self.start_levels if self.ladder[q] in levels]
    if not starts:
      raise ValueError(f"levels: none of {list(levels)} is a start level of the family")
    return build_family(self.name, levels, self.exits, costs, starts, self.gate_overhead,
                        top=levels.index(top))

  def spec(self) -> dict:
    """What determines the family (JSON-serializable); `from_spec` rebuilds it."""
    return {"name": self.name, "ladder": list(self.ladder), "exits": list(self.exits),
            "start_levels": list(self.start_levels), "costs": self.costs.to_dict(),
            "gate_overhead": self.gate_overhead.tolist(), "top": self.top}

  def with_gate_overhead(self, gate_overhead: Sequence[float]) -> "PathFamily":
    """The same family with another per-gate overhead (e.g. a predictor's cost)."""
    return build_family(self.name, self.ladder, self.exits, self.costs, self.start_levels,
                        gate_overhead, self.top)

  def with_costs(self, costs: CostTable) -> "PathFamily":
    """The same states under another cost model (e.g. measured latency); same top level."""
    return build_family(self.name, self.ladder, self.exits, costs, self.start_levels, top=self.top)


def from_spec(spec: dict) -> PathFamily:
  return build_family(spec["name"], spec["ladder"], tuple(spec["exits"]),
                      CostTable.from_dict(spec["costs"]), tuple(spec["start_levels"]),
                      spec.get("gate_overhead"), spec.get("top"))


class _State(NamedTuple):
  """A trie state while the family is built; `PathFamily` keeps each field as an array."""
  gate: int
  parent: int  # -1 for a root
  level: int  # of the last segment
  start: int  # level of the first segment
  switched: bool  # whether the history contains a level change
  history: tuple[int, ...]  # level index per block run
  cost: float  # cumulative, as `PathFamily.cost`


def _next_levels(rule: str, gate: int, level: int, switched: bool, num_levels: int
                 ) -> list[int]:
  """Levels the segment after `gate` may run at, from a state at `gate`."""
  free = (rule == "once" and not switched) or (rule == "first_gate" and gate == 0)
  return list(range(num_levels)) if free else [level]


def _check_args(name: str, ladder: precision.Ladder | Sequence[str], exits: tuple[int, ...],
                costs: CostTable, start_levels: Sequence[int] | None,
                gate_overhead: Sequence[float] | None, top: int | None
                ) -> tuple[precision.Ladder, tuple[int, ...], tuple[int, ...], np.ndarray, int]:
  """`build_family`'s arguments validated and normalized: (ladder, exits, start_levels,
  gate overhead array, top)."""
  if name not in _RULES:
    raise ValueError(f"family: expected one of {FAMILIES}, got {name!r}")
  ladder = precision.parse_ladder(ladder)
  exits = validate_exits(tuple(exits), costs.blocks.shape[0])
  if ladder != tuple(costs.ladder):
    raise ValueError(f"costs: computed for ladder {list(costs.ladder)}, not {list(ladder)}")
  if len(costs.heads) != len(exits):
    raise ValueError(f"costs: has {len(costs.heads)} exit heads, exits {exits} need {len(exits)}")
  num_levels = len(ladder)
  start_levels = tuple(range(num_levels)) if start_levels is None else tuple(start_levels)
  if (not start_levels or len(set(start_levels)) != len(start_levels)
      or any(not isinstance(q, (int, np.integer)) or not 0 <= q < num_levels
             for q in start_levels)):
    raise ValueError(f"start_levels: expected distinct level indices in [0, {num_levels}),"
                     f" got {start_levels}")
  start_levels = tuple(int(q) for q in start_levels)
  overhead = (np.zeros(len(exits)) if gate_overhead is None
              else np.asarray(gate_overhead, np.float64))
  if overhead.shape != (len(exits),) or (overhead < 0).any():
    raise ValueError(f"gate_overhead: expected {len(exits)} non-negative costs,"
                     f" got {gate_overhead}")
  if top is None:
    top = int(np.argmax(costs.blocks.sum(axis=0)))
  if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not 0 <= top < num_levels:
    raise ValueError(f"top: expected a level index in [0, {num_levels}), got {top!r}")
  return ladder, exits, start_levels, overhead, int(top)


def _segment_costs(costs: CostTable, exits: tuple[int, ...], overhead: np.ndarray
                   ) -> list[list[float]]:
  """[G][Q] cost of the segment ending at gate g at level q: blocks, exit head, overhead."""
  bounds = (0,) + exits
  return [[costs.blocks[bounds[g]:bounds[g + 1], q].sum() + costs.heads[g] + overhead[g]
           for q in range(len(costs.ladder))] for g in range(len(exits))]


def _grow_states(rule: str, exits: tuple[int, ...], start_levels: tuple[int, ...],
                 embed: float, seg_cost: list[list[float]]) -> list[_State]:
  """Every state of the family, gate by gate: the roots at gate 0 (one per start level),
  then each state of the previous gate extended by one segment at each level it may
  take; the children of a gate are sorted by (segment level, parent)."""
  num_levels = len(seg_cost[0])
  states = [_State(0, -1, q, q, False, (q,) * exits[0], embed + seg_cost[0][q])
            for q in start_levels]
  frontier = list(range(len(states)))
  for gate in range(1, len(exits)):
    children = []
    for p in frontier:
      st = states[p]
      for q in _next_levels(rule, gate - 1, st.level, st.switched, num_levels):
        seg = (q,) * (exits[gate] - exits[gate - 1])
        children.append(_State(gate, p, q, st.start, st.switched or q != st.level,
                               st.history + seg, st.cost + seg_cost[gate][q]))
    children.sort(key=lambda c: (c.level, c.parent))
    frontier = list(range(len(states), len(states) + len(children)))
    states.extend(children)
  return states


def _candidate_arrays(states: list[_State], rule: str, early_exit: bool,
                      exits: tuple[int, ...], num_levels: int, top: int
                      ) -> tuple[tuple, np.ndarray, np.ndarray]:
  """(candidates, cand_state [S, C], reference [S]) in the padded candidate layout."""
  num_gates = len(exits)
  index = {st.history: s for s, st in enumerate(states)}
  candidates = (None,) + tuple((q, m) for q in range(num_levels) for m in range(num_gates))
  cand_state = np.full((len(states), len(candidates)), -1, np.int32)
  reference = np.full(len(states), EXIT, np.int32)
  for s, st in enumerate(states):
    if early_exit or st.gate == num_gates - 1:
      cand_state[s, EXIT] = s
    if st.gate == num_gates - 1:
      continue  # the last gate always exits
    targets = range(st.gate + 1, num_gates) if early_exit else [num_gates - 1]
    allowed = _next_levels(rule, st.gate, st.level, st.switched, num_levels)
    for q in allowed:
      for m in targets:
        seg = (q,) * (exits[m] - exits[st.gate])
        cand_state[s, 1 + q * num_gates + m] = index[st.history + seg]
    reference[s] = 1 + (top if top in allowed else st.level) * num_gates + num_gates - 1
  return candidates, cand_state, reference


def _child_array(states: list[_State], num_levels: int) -> np.ndarray:
  """[S, Q] the state one segment on at level q (-1 where not allowed)."""
  child = np.full((len(states), num_levels), -1, np.int32)
  for s, st in enumerate(states):
    if st.parent >= 0:
      child[st.parent, st.level] = s
  return child


def build_family(name: str, ladder: precision.Ladder | Sequence[str], exits: tuple[int, ...],
                 costs: CostTable, start_levels: Sequence[int] | None = None,
                 gate_overhead: Sequence[float] | None = None, top: int | None = None
                 ) -> PathFamily:
  """Builds the trie of `name` over `ladder` and gates at `exits`.

  Args:
    name: one of FAMILIES.
    ladder: the levels (a `precision.Ladder`, or names), most precise first by convention.
    exits: block counts after which an exit head sits (last = number of blocks).
    costs: normalized costs of the same backbone and ladder.
    start_levels: level indices a path may start at (default: every level).
    gate_overhead: cost charged at each gate besides its exit head, e.g. the
      predictor that takes the decision there (default 0).
    top: the full model's level index (default: the most expensive by `costs`).
  """
  ladder, exits, start_levels, overhead, top = _check_args(
      name, ladder, exits, costs, start_levels, gate_overhead, top)
  rule, early_exit = _RULES[name]
  num_levels = len(ladder)
  states = _grow_states(rule, exits, start_levels, costs.embed,
                        _segment_costs(costs, exits, overhead))

  history = np.full((len(states), exits[-1]), -1, np.int32)
  for s, st in enumerate(states):
    history[s, :len(st.history)] = st.history
  col = _State(*zip(*states))  # field by field: each a tuple over the states
  cost = np.array(col.cost, np.float64)
  candidates, cand_state, reference = _candidate_arrays(
      states, rule, early_exit, exits, num_levels, top)
  cand_mask = cand_state >= 0
  cand_cost = np.where(cand_mask, cost[np.maximum(cand_state, 0)] - cost[:, None], 0.0)
  return PathFamily(
      name=name, ladder=ladder, exits=exits, start_levels=start_levels, costs=costs, top=top,
      gate_overhead=overhead, gate=np.array(col.gate, np.int32),
      parent=np.array(col.parent, np.int32), level=np.array(col.level, np.int32),
      start_level=np.array(col.start, np.int32), switched=np.array(col.switched, bool),
      history=history, cost=cost, child=_child_array(states, num_levels), candidates=candidates,
      cand_state=cand_state, cand_cost=cand_cost, cand_mask=cand_mask, reference=reference)
