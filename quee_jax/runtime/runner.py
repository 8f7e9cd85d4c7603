"""Real adaptive inference: each sample runs only the blocks its policy picks, on the device.

`Runner.classify` cuts a batch into lanes of at most `max_batch` samples, one
per local device, and runs each call of (devices x lane) samples as one
compiled program (`program.run_lane` under `shard_map`): every gate's
compaction, level groups, predictor and decision happen on the device, and
the host gets back the exit states and predictions once, after the last call
of the batch. Programs are compiled per lane size (powers of two times
`min_chunk`, up to max_batch) and kind of decision (QuEE, confidence), so a
new batch of the same size compiles nothing.

`Runner.classify_confidence` runs the baselines the protocol compares QuEE
with through the same program: confidence thresholds per exit at one level
per sample (the naive combination and its budget mixes), or none (a static
level).

Exactness: features are put together by `features.assemble`, as for the
state tables, and the decision is `policy.step`, the simulation's; quantized
matmuls are integer-exact and activation scales are per token, so a sample's
numbers do not depend on its chunk. What can still differ from the tables is
float rounding of a float matmul whose kernel depends on the batch shape, and
the decision's float32 arithmetic (the simulation's is float64): measured in
tests and by experiments/bench_runtime.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.cost import CostTable
from quee_jax.gating import policy
from quee_jax.runtime import program
from quee_jax.runtime.gating import Gating, check_gating


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Per sample: what the runner did; and how many block rows it computed for it."""

  pred: np.ndarray        # [N] predicted class at the exit taken
  exit_state: np.ndarray  # [N] the family's state at the exit
  exit_gate: np.ndarray   # [N] index of the exit taken
  levels: np.ndarray      # [N, num_blocks] level index each block ran at, -1 for blocks not run
  cost: np.ndarray        # [N] counted cost of the path, in the family's cost unit (without
                          # the predictors' overhead where none ran: classify_confidence)
  rows_computed: int      # rows pushed through segments, chunk padding included
  rows_needed: int        # rows of samples that ran a segment

  @property
  def padding(self) -> float:
    """Share of the computed rows that were padding."""
    return 1.0 - self.rows_needed / max(self.rows_computed, 1)


def lane_sizes(max_batch: int, min_chunk: int) -> tuple[int, ...]:
  """The lane sizes programs are compiled for: min_chunk * 2^k below max_batch, and max_batch."""
  sizes, b = [], min_chunk
  while b < max_batch:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (max_batch,)


class Runner:
  """Classifies batches of raw inputs with a QuEE policy, skipping what it does not run.

  Args:
    backbone: the multi-exit model.
    params: its parameters (exit heads included).
    gating: the trained policy (`gating_from_fitted`, `Gating.with_costs`).
    input_shape: the shape of one input (e.g. (28, 28, 1), or (seq_len,) for token ids).
    input_dtype: the inputs' dtype (float32 images, int32 token ids).
    max_batch: samples per lane (per device and call); larger batches take several calls.
    min_chunk: the smallest chunk a level group is run in (padding per group and gate is
      below it); chunks are min_chunk * 2^k rows.
    max_chunk: the largest chunk (default max_batch; rounded down to min_chunk * 2^k): a
      larger group runs as many chunks of it as fit, one after the other. On CPUs a group's
      time per row can grow with the chunk (temporaries touched afresh at every call; MiniLM
      runs fastest in chunks of 32), on accelerators larger is better.
    devices: the local devices lanes run on, one lane each per call (default: all).
  """

  def __init__(self, backbone: Backbone, params: Params, gating: Gating, *,
               input_shape: Sequence[int], input_dtype=np.float32, max_batch: int = 1024,
               min_chunk: int = 16, max_chunk: int | None = None,
               devices: Sequence | None = None):
    check_gating(backbone, gating)
    max_chunk = max_batch if max_chunk is None else max_chunk
    for name, v in (("max_batch", max_batch), ("min_chunk", min_chunk), ("max_chunk", max_chunk)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if min_chunk > max_batch:
      raise ValueError(f"min_chunk: expected at most max_batch {max_batch}, got {min_chunk}")
    if max_chunk < min_chunk:
      raise ValueError(f"max_chunk: expected at least min_chunk {min_chunk}, got {max_chunk}")
    self.devices = list(devices) if devices is not None else jax.local_devices()
    self.backbone, self.gating, self.family = backbone, gating, gating.family
    self.input_shape = tuple(int(s) for s in input_shape)
    self.input_dtype = np.dtype(input_dtype)
    self.max_batch, self.min_chunk, self.max_chunk = max_batch, min_chunk, max_chunk
    self.lane_sizes = lane_sizes(max_batch, min_chunk)
    self.mesh = Mesh(np.array(self.devices), ("lanes",))
    x1 = jax.ShapeDtypeStruct((1, *self.input_shape), self.input_dtype)
    h1 = jax.eval_shape(backbone.embed, params, x1)
    width = None
    if gating.summary_dim:
      width = jax.eval_shape(lambda p, h: backbone.summary(p, 0, h), params, h1).shape[-1]
    consts = program.make_consts(backbone, params, gating, width)
    self.consts = jax.device_put(consts, NamedSharding(self.mesh, P()))
    self._programs: dict[tuple[int, str], jax.stages.Compiled] = {}
    self.compile_s: dict[tuple[int, str], float] = {}  # per (lane size, kind): seconds

  def with_costs(self, costs: CostTable) -> "Runner":
    """This runner, its compiled programs shared, deciding with another cost model."""
    other = copy.copy(self)
    other.gating = self.gating.with_costs(costs)
    other.family = other.gating.family  # the same states: only costs and ΔC differ
    cand_cost = jax.device_put(program.decision_of(other.family).cand_cost,
                               NamedSharding(self.mesh, P()))
    other.consts = self.consts._replace(
        decision=self.consts.decision._replace(cand_cost=cand_cost))
    return other

  def spec(self, batch: int, kind: str) -> program.Spec:
    return program.spec_for(self.gating, batch, self.min_chunk, self.max_chunk, kind)

  def _program(self, batch: int, kind: str, inputs: program.Inputs):
    """The compiled program for lanes of `batch` samples (compiled, and timed, on first use)."""
    key = (batch, kind)
    if key not in self._programs:
      # `program.run_lane` is looked up here, not at import, so that tests can wrap it (chex).
      lane = functools.partial(program.run_lane, self.backbone, self.spec(batch, kind))
      fn = jax.jit(jax.shard_map(lane, mesh=self.mesh, in_specs=(P(), P("lanes")),
                                 out_specs=P("lanes"), check_vma=False))
      t0 = time.perf_counter()
      self._programs[key] = fn.lower(self.consts, inputs).compile()
      self.compile_s[key] = time.perf_counter() - t0
    return self._programs[key]

  def _check_images(self, images) -> np.ndarray:
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
    return images

  def classify(self, images, lam, start=None) -> RunResult:
    """Runs the QuEE policy on images [N, ...] at trade-off `lam` (a number, or one per image).

    start: the level block 1 runs at (a name or index, or one per image); None: the
      level the population-error rule picks for each λ (`policy.start_levels`).
    """
    images = self._check_images(images)
    n = len(images)
    try:
      lam = np.asarray(lam, np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"lam: expected a number or one per image, got {lam!r}") from None
    if lam.ndim == 0:
      lam = np.full(n, float(lam))
    if lam.shape != (n,):
      raise ValueError(f"lam: expected a number or one per image ({n}), got shape {lam.shape}")
    if not np.isfinite(lam).all() or (lam < 0).any():
      raise ValueError(f"lam: expected finite values >= 0, got min {lam.min()}")
    levels = policy.check_starts(self.family, start, n, "start")
    states = policy.start_states(self.family, self.gating.population_err, lam, levels,
                                 self.gating.tau)
    thresholds = np.full((n, self.family.num_gates), np.inf, np.float32)
    return self._run(program.QUEE, images, states, lam, thresholds)

  def classify_confidence(self, images, level, thresholds=None) -> RunResult:
    """Runs confidence early exit on images [N, ...]: every block at `level` (a name or index,
    or one per image), leaving at the first exit g whose max softmax reaches thresholds[g].

    thresholds: [G - 1] (the last exit always takes the rest) or one row per image
      [N, G - 1], e.g. `baselines.confidence_exit`'s; None: no early exit (the static
      level at full depth).
    """
    images = self._check_images(images)
    fam, n = self.family, len(images)
    levels = policy.check_starts(fam, level, n, "level")
    G = fam.num_gates
    thr = np.full((n, G), np.inf, np.float32)
    if thresholds is not None:
      t = np.asarray(thresholds, np.float64)
      if t.shape not in ((G - 1,), (n, G - 1)) or np.isnan(t).any():
        raise ValueError(f"thresholds: expected {G - 1} numbers (one per exit but the last) or"
                         f" [{n}, {G - 1}], without NaN; got shape {t.shape}")
      thr[:, :G - 1] = np.broadcast_to(t, (n, G - 1))
    states = np.array([fam.chain(int(q))[0] for q in levels], np.int64)
    return self._run(program.CONFIDENCE, images, states, np.zeros(n), thr)

  def _run(self, kind: str, images: np.ndarray, states: np.ndarray, lam: np.ndarray,
           thresholds: np.ndarray) -> RunResult:
    """Every call of the batch dispatched, then one transfer back of all their outputs."""
    n, D = len(images), len(self.devices)
    per_device = -(-n // D)
    batch = next((b for b in self.lane_sizes if b >= per_device), self.max_batch)
    per_call = batch * D
    sharding = NamedSharding(self.mesh, P("lanes"))
    outs = []
    for lo in range(0, n, per_call):
      m = min(per_call, n - lo)
      idx = np.minimum(np.arange(lo, lo + per_call), n - 1)  # the tail repeats the last sample
      inputs = program.Inputs(images[idx], states[idx].astype(np.int32),
                              lam[idx].astype(np.float32), thresholds[idx],
                              np.arange(per_call) < m)
      inputs = jax.device_put(inputs, sharding)
      outs.append(self._program(batch, kind, inputs)(self.consts, inputs))
    outs = jax.device_get(outs)  # the one transfer back: after every call was dispatched
    state = np.concatenate([o.exit_state for o in outs])[:n]
    pred = np.concatenate([o.pred for o in outs])[:n]
    fam = self.family
    cost = fam.cost[state]
    if kind == program.CONFIDENCE:  # no predictor runs: its overhead is not spent
      cost = cost - np.cumsum(fam.gate_overhead)[fam.gate[state]]
    return RunResult(pred=pred, exit_state=state, exit_gate=fam.gate[state],
                     levels=fam.history[state], cost=cost,
                     rows_computed=int(sum(o.rows_computed.sum() for o in outs)),
                     rows_needed=int(sum(o.rows_needed.sum() for o in outs)))
