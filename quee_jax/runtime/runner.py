"""Real adaptive inference: each sample runs only the blocks its policy picks.

A batch goes through the network gate by gate. At gate g the samples still
active are grouped by the level of their next segment; each group is gathered
(compacted, not masked) out of a buffer of hidden states, padded to a bucket
size, and pushed through one compiled program: the segment's blocks at that
level, the exit head, the softmax statistics, the predictor features and the
error predictor. The predicted errors come back to the host, which decides
with `policy.step`, the function `policy.simulate` decides with, and regroups
the samples that continue. Programs are keyed by (gate, level, bucket), so
their number is bounded by gates x levels x buckets whatever the data.

Exactness: features are put together by `features.assemble`, as for the
state tables; quantized matmuls are integer-exact and activation scales are
per token, so a sample's numbers do not depend on its group. What can still
differ from the tables is float rounding of a float matmul whose kernel
depends on the batch shape (measured in tests and by experiments/bench_runtime.py).

Lanes: a batch is cut into lanes of at most max_batch samples, dealt out to
the devices; an accelerator keeps two lanes in flight (`lanes_per_device`,
each with its own buffers), served round robin, so that it computes one
lane's gate while the host decides another's: host and device work overlap.

Latency cost model (`latency_costs`): the runner's own programs timed on the
device at hand, per sample, normalized like BOPs; `Gating.with_costs` turns
it into a policy whose ΔC is time. The predictors are the same.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core import precision

from quee_jax.gating import features, policy, predictor
from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.exit_stats import softmax_features, summary_projection
from quee_jax.core.cost import CostTable
from quee_jax.core.paths import PathFamily


@dataclasses.dataclass(frozen=True)
class Gating:
  """What a trained QuEE policy is made of (everything but the backbone and λ).

  Attributes:
    family: the path family: states, candidates, and the costs ΔC is taken from.
    predictor: the per-gate MLPs (`predictor.train`), with their "shrink"
      calibration if the evaluation used one.
    predictor_level: the level the predictors run at.
    population_err: `policy.start_errors` of the fit table (the start level).
    tau: the decision rule's soft floor (`policy`).
  """

  family: PathFamily
  predictor: Params
  predictor_level: str
  population_err: np.ndarray
  tau: float = policy.SOFT_FLOOR

  @property
  def num_features(self) -> int:
    return int(np.shape(self.predictor["mean"])[0])

  @property
  def summary_dim(self) -> int:
    """Dimensions of the projected exit summary among the predictor's inputs."""
    return self.num_features - features.num_features(self.family, 0)

  def with_costs(self, costs: CostTable) -> "Gating":
    """The same predictors deciding with another cost model (e.g. `latency_costs`)."""
    return dataclasses.replace(self, family=self.family.with_costs(costs))


def gating_from_fitted(fitted, predictor_level: str) -> Gating:
  """A `Gating` from an `evaluate.Fitted` (its family already counts the predictors)."""
  return Gating(fitted.family, fitted.params, predictor_level, fitted.population_err, fitted.tau)


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Per sample: what the runner did."""

  pred: np.ndarray        # [N] predicted class at the exit taken
  exit_state: np.ndarray  # [N] the family's state at the exit
  exit_gate: np.ndarray   # [N] index of the exit taken
  levels: np.ndarray      # [N, num_blocks] level index each block ran at, -1 for blocks not run
  cost: np.ndarray        # [N] counted cost of the path, in the family's cost unit


def _buckets(max_batch: int, min_bucket: int) -> tuple[int, ...]:
  """min_bucket, 1.5x, 2x, 3x, 4x, ... (multiples of 8 above 8) up to max_batch, and max_batch.

  Half steps between powers of two pad a group by at most a third (not a half).
  """
  out, b = set(), min_bucket
  while b < max_batch:
    out.update((b, min(max_batch, -(-(3 * b // 2) // 8) * 8 if b >= 8 else b)))
    b *= 2
  return tuple(sorted(out | {max_batch}))


# Columns of the per-row host state that features need (`Runner._stage_fn`).
_PARENT, _ANC_PRED, _ANC_MAX_PROB, _HAS_ANC = slice(0, 3), 3, 4, 5
_HOST_COLS = 6


class Runner:
  """Classifies batches of raw inputs with a QuEE policy, skipping what it does not run.

  Args:
    backbone: the multi-exit model.
    params: its parameters (exit heads included).
    gating: the trained policy (`gating_from_fitted`, `Gating.with_costs`).
    input_shape: the shape of one input (e.g. (28, 28, 1), or (seq_len,) for token ids).
    input_dtype: the inputs' dtype (float32 images, int32 token ids).
    max_batch: samples per lane; larger batches are cut into lanes.
    min_bucket: the smallest padded group size; buckets grow by half steps
      (x1.5, x2) up to max_batch.
    devices: the devices lanes run on (default: every local device).
    lanes_per_device: lanes in flight per device. Default: 2 on accelerators (the host
      decides one lane's gate while the device runs the other's), 1 on CPUs, where the
      "device" is the host's own cores and a second lane only competes with them (FMNIST
      ViT on 2 cores: -8% to +7% throughput).
  """

  def __init__(self, backbone: Backbone, params: Params, gating: Gating, *,
               input_shape: Sequence[int], input_dtype=np.float32, max_batch: int = 1024,
               min_bucket: int = 32, devices: Sequence | None = None,
               lanes_per_device: int | None = None):
    fam = gating.family
    if tuple(fam.exits) != tuple(backbone.exits):
      raise ValueError(f"gating: family built for exits {fam.exits}, the backbone has {backbone.exits}")
    p = gating.predictor
    G, C, F = fam.num_gates, len(fam.candidates), gating.num_features
    for key, shape in (("w1", (G, F, None)), ("w2", (G, None, C))):
      got = np.shape(p[key])
      if len(got) != 3 or any(s is not None and s != g for s, g in zip(shape, got)):
        raise ValueError(f"gating: predictor {key} has shape {got}; the family needs {G} gates and"
                         f" {C} candidates (trained for another ladder or exits?)")
    if gating.summary_dim < 0 or (gating.summary_dim > 0 and backbone.summary is None):
      raise ValueError(f"gating: the predictor takes {F} features, which does not fit this"
                       f" backbone and family (trained for another ladder or exits?)")
    if np.shape(gating.population_err) != (len(fam.start_levels), G):
      raise ValueError(f"gating: population_err has shape {np.shape(gating.population_err)},"
                       f" expected {(len(fam.start_levels), G)}")
    self.devices = list(devices) if devices is not None else jax.local_devices()
    if lanes_per_device is None:
      lanes_per_device = 1 if all(d.platform == "cpu" for d in self.devices) else 2
    for name, v in (("max_batch", max_batch), ("min_bucket", min_bucket),
                    ("lanes_per_device", lanes_per_device)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if min_bucket > max_batch:
      raise ValueError(f"min_bucket: expected at most max_batch {max_batch}, got {min_bucket}")
    self.backbone, self.gating, self.family = backbone, gating, fam
    self.input_shape = tuple(int(s) for s in input_shape)
    self.input_dtype = np.dtype(input_dtype)
    self.max_batch, self.buckets = max_batch, _buckets(max_batch, min_bucket)
    self.lanes_per_device = lanes_per_device
    self._pred_level = precision.parse_level(gating.predictor_level)
    self._onehot = features.state_onehots(fam)
    self._anc_changes = fam.level[np.maximum(fam.parent, 0)] != fam.level  # a switch into s
    self._shrink = p.get("shrink")
    x1 = jax.ShapeDtypeStruct((1, *self.input_shape), self.input_dtype)
    h1 = jax.eval_shape(backbone.embed, params, x1)
    self._hidden = (h1.shape[1:], h1.dtype)
    proj = None
    if gating.summary_dim:
      width = jax.eval_shape(lambda p, h: backbone.summary(p, 0, h), params, h1).shape[-1]
      proj = summary_projection(width, gating.summary_dim)
    mlp = {k: p[k] for k in predictor.MLP_KEYS}
    # One copy of everything per lane device.
    self._consts = [jax.device_put((params, mlp, proj), d) for d in self.devices]
    self.num_traces = 0
    self._stage = jax.jit(self._stage_fn, static_argnames=("gate", "level", "blocks"),
                          donate_argnames=("hidden", "last_logits"))

  def with_costs(self, costs: CostTable) -> "Runner":
    """This runner, its compiled programs shared, deciding with another cost model."""
    other = copy.copy(self)
    other.gating = self.gating.with_costs(costs)
    other.family = other.gating.family  # the same states: only costs and ΔC differ
    return other

  # -- the compiled program of one (gate, level, bucket) ----------------------

  def _stage_fn(self, consts, hidden, last_logits, rows, images, host, *, gate: int,
                level: int, blocks: bool = True):
    """One group at one gate: [embed,] segment, exit, features, predicted errors.

    hidden [max_batch + 1, ...] and last_logits [max_batch + 1, C] hold each
    row's state (the last row takes the padding); rows [b] are the group's rows;
    host [b, _HOST_COLS + O]: the previous exit's statistics, the switch
    ancestor's prediction and max prob, and the state's one-hots (float32; the
    integers in it are small, so exact).
    """
    self.num_traces += 1  # runs at trace time only: counts compilations
    params, mlp, proj = consts
    bb, fam = self.backbone, self.family
    bounds = (0,) + fam.exits
    h = bb.embed(params, images) if gate == 0 else hidden[rows]
    if blocks:
      for i in range(bounds[gate], bounds[gate + 1]):
        h = bb.block(params, i, h, fam.ladder[level])
    logits = bb.exit_head(params, gate, h)
    stats = softmax_features(logits, None if gate == 0 else last_logits[rows])
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = {"pred": pred, **{k: stats[k] for k in ("max_prob", "margin", "entropy")}}
    if gate < fam.num_gates - 1:  # the last gate always exits: no predictor, nothing to keep
      hidden = hidden.at[rows].set(h.astype(hidden.dtype))
      last_logits = last_logits.at[rows].set(logits.astype(jnp.float32))
      summary = None
      if proj is not None:
        summary = bb.summary(params, gate, h).astype(jnp.float32) @ proj
      x = features.assemble(stats, host[:, _PARENT], host[:, _ANC_PRED].astype(jnp.int32),
                            host[:, _ANC_MAX_PROB], host[:, _HAS_ANC] > 0, pred, summary,
                            host[:, _HOST_COLS:])
      out["errors"] = jax.nn.sigmoid(predictor.logits(mlp, x, gate, self._pred_level))
    return hidden, last_logits, out

  # -- host side ---------------------------------------------------------------

  def _check_inputs(self, images, lam, start) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != len(self.input_shape) + 1 or images.shape[1:] != self.input_shape:
      raise ValueError(f"images: expected shape [N, {', '.join(map(str, self.input_shape))}],"
                       f" got {list(images.shape)}")
    if images.dtype != self.input_dtype:
      raise ValueError(f"images: expected {self.input_dtype} (preprocessed as in training),"
                       f" got {images.dtype}")
    if len(images) == 0:
      raise ValueError("images: expected at least one image, got none")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
      bad = int((~np.isfinite(images.reshape(len(images), -1))).any(axis=1).sum())
      raise ValueError(f"images: {bad} image(s) hold NaN or infinite values")
    if self.backbone.check_inputs is not None:  # e.g. token ids beyond the vocabulary
      self.backbone.check_inputs(images)
    lam = np.asarray(lam, np.float64)
    if lam.ndim == 0:
      lam = np.full(len(images), float(lam))
    if lam.shape != (len(images),):
      raise ValueError(f"lam: expected a number or one per image ({len(images)}), got shape {lam.shape}")
    if not np.isfinite(lam).all() or (lam < 0).any():
      raise ValueError(f"lam: expected finite values >= 0, got min {lam.min()}")
    return images, lam, policy.check_starts(self.family, start, len(images), "start")

  def classify(self, images, lam, start=None) -> RunResult:
    """Runs the policy on images [N, ...] at trade-off `lam` (a number, or one per image).

    start: the level block 1 runs at (a name or index, or one per image); None: the
      level the population-error rule picks for each λ (`policy.start_levels`).
    """
    images, lam, levels = self._check_inputs(images, lam, start)
    fam = self.family
    n = len(images)
    start = policy.start_states(fam, self.gating.population_err, lam, levels,
                                self.gating.tau).astype(np.int32)
    state, pred = np.empty(n, np.int32), np.empty(n, np.int32)
    per_pass = self.max_batch * len(self.devices)
    jobs = [[] for _ in self.devices]  # per device, its lanes' sample indices in order
    for lo in range(0, n, per_pass):
      for d, idx in enumerate(np.array_split(np.arange(lo, min(n, lo + per_pass)), len(self.devices))):
        if len(idx):
          jobs[d].append(idx)
    for idx, s, p in self._run_lanes(images, lam, start, jobs):
      state[idx], pred[idx] = s, p
    levels = fam.history[state]
    return RunResult(pred=pred, exit_state=state, exit_gate=fam.gate[state], levels=levels,
                     cost=fam.cost[state])

  def _bucket(self, m: int) -> int:
    return next(b for b in self.buckets if b >= m)

  def _zero_buffers(self, device) -> list:
    """[hidden [max_batch + 1, ...], last exit logits [max_batch + 1, C]] of one lane."""
    hid_shape, hid_dtype = self._hidden
    rows = self.max_batch + 1  # the last row takes the padding
    return [jnp.zeros((rows, *hid_shape), hid_dtype, device=device),
            jnp.zeros((rows, self.backbone.num_classes), jnp.float32, device=device)]

  def _run_lanes(self, images, lam, start, jobs):
    """Runs every lane gate by gate; yields (sample indices, exit state, prediction) per lane.

    jobs: per device, the sample indices of its lanes (at most max_batch each). Up to
    `lanes_per_device` lanes per device are in flight, served round robin: while the host
    fetches one lane's results, decides and dispatches its next gate, the device runs the
    programs the other lanes have queued. A lane slot's buffers serve its lanes one after
    another: a row read at a gate was written by the same lane at the gate before.
    """
    running = collections.deque()

    def launch(d: int, buffers) -> None:
      if jobs[d]:
        idx = jobs[d].pop(0)
        m = len(idx)
        ln = {"dev": d, "idx": idx, "lam": lam[idx], "cur": start[idx].copy(), "gate": 0,
              "active": np.arange(m), "done_state": np.full(m, -1, np.int32),
              "done_pred": np.full(m, -1, np.int32), "host": np.zeros((m, _HOST_COLS), np.float32),
              "buffers": buffers if buffers is not None else self._zero_buffers(self.devices[d])}
        self._dispatch(ln, images)
        running.append(ln)

    for d in range(len(self.devices)):
      for _ in range(self.lanes_per_device):
        launch(d, None)
    while running:
      ln = running.popleft()
      self._collect(ln)
      if len(ln["active"]):
        self._dispatch(ln, images)
        running.append(ln)
      else:
        yield ln["idx"], ln["done_state"], ln["done_pred"]
        launch(ln["dev"], ln["buffers"])

  def _dispatch(self, ln: dict, images) -> None:
    """Queues the programs of the lane's current gate, one per level group (not waiting)."""
    gate, groups = ln["gate"], []
    act = ln["active"]
    lv = self.family.level[ln["cur"][act]]
    for q in np.unique(lv):
      members = act[lv == q]
      m, b = len(members), self._bucket(len(members))
      rows = np.full(b, self.max_batch, np.int32)  # padding rows write the spare row
      rows[:m] = members
      host = np.zeros((b, _HOST_COLS + self._onehot.shape[1]), np.float32)
      host[:m, :_HOST_COLS] = ln["host"][members]
      host[:m, _HOST_COLS:] = self._onehot[ln["cur"][members]]
      imgs = None
      if gate == 0:
        imgs = np.zeros((b, *self.input_shape), self.input_dtype)
        imgs[:m] = images[ln["idx"][members]]
      buf = ln["buffers"]
      buf[0], buf[1], out = self._stage(self._consts[ln["dev"]], buf[0], buf[1], rows, imgs,
                                        host, gate=gate, level=int(q))
      groups.append((members, out))
    ln["pending"] = groups

  def _collect(self, ln: dict) -> None:
    """Fetches the lane's results of its current gate, decides, and moves it to the next gate."""
    groups = ln.pop("pending")
    outs = [jax.device_get(out) for _, out in groups]
    members = np.concatenate([mem for mem, _ in groups])
    out = {k: np.concatenate([o[k][:len(mem)] for (mem, _), o in zip(groups, outs)])
           for k in outs[0]}
    self._decide(ln, ln["gate"], members, out)
    ln["active"] = np.flatnonzero(ln["done_state"] < 0)
    ln["gate"] += 1

  def _decide(self, ln, gate: int, members: np.ndarray, out: dict) -> None:
    fam = self.family
    cur, pred = ln["cur"][members], out["pred"]
    if gate == fam.num_gates - 1:
      exiting, nxt = np.ones(len(members), bool), cur
    else:
      errors = out["errors"]
      if self._shrink is not None:
        errors = predictor.apply_shrinkage(errors, self._shrink, fam, states=cur)
      exiting, nxt = policy.step(fam, cur, errors, ln["lam"][members], self.gating.tau)
    ln["done_state"][members[exiting]] = cur[exiting]
    ln["done_pred"][members[exiting]] = pred[exiting]
    go = ~exiting
    moved, nxt = members[go], nxt[go]
    host = ln["host"]
    host[moved, _PARENT] = np.stack([out[k][go] for k in ("max_prob", "margin", "entropy")], -1)
    switch = self._anc_changes[nxt]
    host[moved[switch], _ANC_PRED] = pred[go][switch]
    host[moved[switch], _ANC_MAX_PROB] = out["max_prob"][go][switch]
    host[moved[switch], _HAS_ANC] = 1.0
    ln["cur"][moved] = nxt

  # -- latency ---------------------------------------------------------------

  def time_stage(self, gate: int, level: int, blocks: bool = True, reps: int = 5) -> float:
    """Seconds per sample of the (gate, level) program at the largest bucket on lane 0: the
    fastest of `reps` calls (what the program costs when nothing else competes for the device)."""
    b = self.max_batch
    rng = np.random.default_rng(0)
    dev = self.devices[0]
    hidden, logits = self._zero_buffers(dev)
    hidden = jax.device_put(jnp.asarray(rng.normal(size=hidden.shape), hidden.dtype), dev)
    rows = np.arange(b, dtype=np.int32)
    s = self.family.states_at(gate)[0]
    host = np.zeros((b, _HOST_COLS + self._onehot.shape[1]), np.float32)
    host[:, _HOST_COLS:] = self._onehot[s]
    imgs = None
    if gate == 0:  # token ids: 1, a valid non-padding id
      imgs = (rng.normal(size=(b, *self.input_shape)) if np.issubdtype(self.input_dtype, np.floating)
              else np.ones((b, *self.input_shape))).astype(self.input_dtype)
    times = []
    for _ in range(reps + 1):  # the first call compiles
      t0 = time.perf_counter()
      hidden, logits, out = self._stage(self._consts[0], hidden, logits, rows, imgs, host,
                                        gate=gate, level=level, blocks=blocks)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
    return float(np.min(times[1:])) / b


def latency_costs(runner: Runner, reps: int = 5) -> CostTable:
  """The runner's own programs timed per sample on its first device, normalized like BOPs.

  blocks[i, q]: (time of the (gate, q) program - the same program without its
  blocks) / blocks in the segment. heads[g]: the program without blocks: the
  exit head, features, predictor, gather and scatter, and at gate 0 the
  embedding (every path pays gate 0's once, so `embed` is 0). Normalized so
  that 1 is the runner's full path: every gate's program at the family's top
  level (by counted cost), as λ = 0 runs it.
  """
  fam = runner.family
  bounds = (0,) + fam.exits
  heads = np.array([runner.time_stage(g, 0, blocks=False, reps=reps) for g in range(fam.num_gates)])
  blocks = np.zeros((fam.num_blocks, len(fam.ladder)))
  for g in range(fam.num_gates):
    for q in range(len(fam.ladder)):
      seg = runner.time_stage(g, q, reps=reps) - heads[g]
      blocks[bounds[g]:bounds[g + 1], q] = max(seg, 0.0) / (bounds[g + 1] - bounds[g])
  full = blocks[:, fam.top].sum() + heads.sum()  # the runner at λ = 0 runs every gate's program
  return CostTable(unit="seconds", float_bits=fam.costs.float_bits, ladder=fam.ladder, embed=0.0,
                   blocks=blocks / full, heads=heads / full, full_model=float(full))
