"""The lane loop of `Runner.classify`: dispatch a gate's programs, collect, decide, repeat.

A batch is cut into lanes of at most max_batch samples, dealt out to the
devices; an accelerator keeps two lanes in flight (`lanes_per_device`, each
with its own buffers), served round robin, so that it computes one lane's gate
while the host decides another's: host and device work overlap.

At gate g the samples of a lane still active are grouped by the level of their
next segment; each group is gathered (compacted, not masked) out of the lane's
buffers, padded to a bucket size and pushed through one stage program
(`stage`). The predicted errors come back to the host, which decides with
`policy.step`, the function `policy.simulate` decides with, and regroups the
samples that continue.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator

import jax
import numpy as np

from quee_jax.gating import policy, predictor
from quee_jax.runtime.gating import Gating
from quee_jax.runtime.stage import Buffers, RowState, Stage, StageOut


@dataclasses.dataclass(frozen=True)
class LaneSpec:
  """How a runner cuts, pads and spreads a batch (`Runner`'s arguments of the same names)."""

  num_devices: int
  lanes_per_device: int
  max_batch: int
  buckets: tuple[int, ...]        # the padded group sizes, increasing, the last max_batch
  input_shape: tuple[int, ...]
  input_dtype: np.dtype


@dataclasses.dataclass(eq=False)
class Lane:
  """Up to max_batch samples of a batch, on their way through the gates of one device.

  Per-sample arrays are indexed by the lane's own sample positions 0..m-1.
  """

  device: int              # index into the runner's devices
  idx: np.ndarray          # [m] the samples' indices in the batch
  lam: np.ndarray          # [m] their trade-off λ
  row_state: RowState      # [max_batch + 1] what the next gate's programs need of each
                           # sample, its current state included; the last row is spare
  buffers: Buffers         # the lane slot's device buffers (row i: sample i)
  active: np.ndarray       # positions still running
  done_state: np.ndarray   # [m] int32: the exit state, -1 while running
  done_pred: np.ndarray    # [m] int32: the prediction at the exit, -1 while running
  gate: int = 0            # the gate whose programs run (or are queued) next
  # The current gate's queued programs: per level group, (its positions, its outputs).
  pending: list[tuple[np.ndarray, StageOut]] = dataclasses.field(default_factory=list)


class LaneLoop:
  """One `Runner.classify` call: its lanes, run gate by gate.

  stage: the runner's compiled programs; gating: the policy deciding (its family's costs
  give ΔC); spec: how the batch is cut and padded; images, lam, start: the checked batch,
  λ per sample and start state per sample.
  """

  def __init__(self, stage: Stage, gating: Gating, spec: LaneSpec, images: np.ndarray,
               lam: np.ndarray, start: np.ndarray):
    self.stage, self.gating, self.family, self.spec = stage, gating, gating.family, spec
    self.images, self.lam, self.start = images, lam, start
    fam = self.family
    self.anc_changes = fam.level[np.maximum(fam.parent, 0)] != fam.level  # a switch into s
    self.shrink = gating.predictor.get("shrink")

  def run(self, jobs: list[list[np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]]:
    """Runs every lane; yields (sample indices, exit state, prediction) per lane as it ends.

    jobs: per device, the sample indices of its lanes (at most max_batch each), in
    order. Up to `lanes_per_device` lanes per device are in flight, served round
    robin: while the host fetches one lane's results, decides and dispatches its
    next gate, the device runs the programs the other lanes have queued. A lane
    slot's buffers serve its lanes one after another: a row read at a gate was
    written by the same lane at the gate before.
    """
    running = collections.deque()

    def launch(device: int, buffers: Buffers | None) -> None:
      if jobs[device]:
        lane = self._new_lane(device, jobs[device].pop(0), buffers)
        self._dispatch(lane)
        running.append(lane)

    for d in range(self.spec.num_devices):
      for _ in range(self.spec.lanes_per_device):
        launch(d, None)
    while running:
      lane = running.popleft()
      self._collect(lane)
      if len(lane.active):
        self._dispatch(lane)
        running.append(lane)
      else:
        yield lane.idx, lane.done_state, lane.done_pred
        launch(lane.device, lane.buffers)

  def _new_lane(self, device: int, idx: np.ndarray, buffers: Buffers | None) -> Lane:
    row_state = RowState.start(self.start[idx], self.spec.max_batch + 1)  # row i: sample i
    if buffers is None:
      buffers = self.stage.zero_buffers(device)
    m = len(idx)
    return Lane(device, idx, self.lam[idx], row_state, buffers, active=np.arange(m),
                done_state=np.full(m, -1, np.int32), done_pred=np.full(m, -1, np.int32))

  def _dispatch(self, lane: Lane) -> None:
    """Queues the programs of the lane's current gate, one per level group (not waiting)."""
    r = self.spec
    act = lane.active
    lv = self.family.level[lane.row_state.state[act]]
    for q in np.unique(lv):
      members = act[lv == q]
      m = len(members)
      b = next(b for b in r.buckets if b >= m)
      rows = np.full(b, r.max_batch, np.int32)  # padding rows write the spare row
      rows[:m] = members
      imgs = None
      if lane.gate == 0:
        imgs = np.zeros((b, *r.input_shape), r.input_dtype)
        imgs[:m] = self.images[lane.idx[members]]
      lane.buffers, out = self.stage(lane.device, lane.buffers, rows, imgs,
                                     lane.row_state.take(rows), gate=lane.gate, level=int(q))
      lane.pending.append((members, out))

  def _collect(self, lane: Lane) -> None:
    """Fetches the lane's results of its current gate, decides, and moves it to the next gate."""
    groups, lane.pending = lane.pending, []
    outs = jax.device_get([out for _, out in groups])
    members = np.concatenate([mem for mem, _ in groups])
    # Per field, the groups' real rows (not their padding) in the order of `members`.
    out = StageOut(*(None if parts[0] is None else
                     np.concatenate([p[:len(mem)] for (mem, _), p in zip(groups, parts)])
                     for parts in zip(*outs)))
    self._decide(lane, members, out)
    lane.active = np.flatnonzero(lane.done_state < 0)
    lane.gate += 1

  def _decide(self, lane: Lane, members: np.ndarray, out: StageOut) -> None:
    """Exits or moves on each of `members` (positions) after its current gate's program."""
    fam = self.family
    cur, pred = lane.row_state.state[members], out.pred
    if lane.gate == fam.num_gates - 1:
      exiting, nxt = np.ones(len(members), bool), cur
    else:
      errors = out.errors
      if self.shrink is not None:
        errors = predictor.apply_shrinkage(errors, self.shrink, fam, states=cur)
      exiting, nxt = policy.step(fam, cur, errors, lane.lam[members], self.gating.tau)
    lane.done_state[members[exiting]] = cur[exiting]
    lane.done_pred[members[exiting]] = pred[exiting]
    go = ~exiting
    moved, nxt = members[go], nxt[go]
    st = lane.row_state
    st.parent_stats[moved] = np.stack([out.max_prob[go], out.margin[go], out.entropy[go]], -1)
    switch = self.anc_changes[nxt]
    st.anc_pred[moved[switch]] = pred[go][switch]
    st.anc_max_prob[moved[switch]] = out.max_prob[go][switch]
    st.state[moved] = nxt
