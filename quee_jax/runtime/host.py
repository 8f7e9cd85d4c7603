"""Real adaptive inference: each sample runs only the blocks its policy picks.

A batch goes through the network gate by gate (`lanes`). At gate g the
samples still active are grouped by the level of their next segment, and each
group goes through one compiled stage program (`stage`): the segment's blocks
at that level, the exit head, the softmax statistics, the predictor features
and the error predictor. The predicted errors come back to the host, which
decides with `policy.step`, the function `policy.simulate` decides with.

Exactness: features are put together by `features.assemble`, as for the
state tables; quantized matmuls are integer-exact and activation scales are
per token, so a sample's numbers do not depend on its group. What can still
differ from the tables is float rounding of a float matmul whose kernel
depends on the batch shape (measured in tests and by experiments/bench_runtime.py).

Latency cost model: `latency.latency_costs`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import jax
import numpy as np

from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.cost import CostTable
from quee_jax.gating import policy
from quee_jax.runtime.gating import Gating, check_gating
from quee_jax.runtime.lanes import LaneLoop, LaneSpec
from quee_jax.runtime.stage import Stage


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


class HostRunner:
  """The host-driven runner (returns to the host at every gate), kept to be measured against
  `runner.Runner`, the device-resident one.

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
    check_gating(backbone, gating)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    if lanes_per_device is None:
      lanes_per_device = 1 if all(d.platform == "cpu" for d in self.devices) else 2
    for name, v in (("max_batch", max_batch), ("min_bucket", min_bucket),
                    ("lanes_per_device", lanes_per_device)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if min_bucket > max_batch:
      raise ValueError(f"min_bucket: expected at most max_batch {max_batch}, got {min_bucket}")
    self.backbone, self.gating, self.family = backbone, gating, gating.family
    self.input_shape = tuple(int(s) for s in input_shape)
    self.input_dtype = np.dtype(input_dtype)
    self.max_batch, self.buckets = max_batch, _buckets(max_batch, min_bucket)
    self.lanes_per_device = lanes_per_device
    self.stage = Stage(backbone, params, gating, input_shape=self.input_shape,
                       input_dtype=self.input_dtype, max_batch=max_batch, devices=self.devices)

  def with_costs(self, costs: CostTable) -> "HostRunner":
    """This runner, its compiled programs shared, deciding with another cost model."""
    other = copy.copy(self)
    other.gating = self.gating.with_costs(costs)
    other.family = other.gating.family  # the same states: only costs and ΔC differ
    return other

  def _check_inputs(self, images, lam, start) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, λ per image, start level per image), or ValueError before anything runs."""
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
    try:
      lam = np.asarray(lam, np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"lam: expected a number or one per image, got {lam!r}") from None
    if lam.ndim == 0:
      lam = np.full(len(images), float(lam))
    if lam.shape != (len(images),):
      raise ValueError(f"lam: expected a number or one per image ({len(images)}),"
                       f" got shape {lam.shape}")
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
      batch = np.arange(lo, min(n, lo + per_pass))
      for d, idx in enumerate(np.array_split(batch, len(self.devices))):
        if len(idx):
          jobs[d].append(idx)
    spec = LaneSpec(len(self.devices), self.lanes_per_device, self.max_batch, self.buckets,
                    self.input_shape, self.input_dtype)
    for idx, s, p in LaneLoop(self.stage, self.gating, spec, images, lam, start).run(jobs):
      state[idx], pred[idx] = s, p
    levels = fam.history[state]
    return RunResult(pred=pred, exit_state=state, exit_gate=fam.gate[state], levels=levels,
                     cost=fam.cost[state])
