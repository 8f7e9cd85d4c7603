"""Latency cost model: a runner's own chunk bodies timed on the device at hand.

`latency_model` times every (gate, level) chunk body (`program.chunk`: gather, segment,
exit head, features, predictor, scatter) with and without its blocks,
interleaved pair by pair so that load from elsewhere hits both alike, and
returns a `LatencyModel`: the `CostTable` (normalized like BOPs) and the spread
of each block time. `latency_costs` is its `.costs`; `Gating.with_costs` (or
`Runner.with_costs`) makes it a policy whose ΔC is time. The predictors are
the same.

A block time is a difference of two noisy timings, so on a loaded machine it
can come out at or below 0. A block that costs nothing is a wrong cost model
(the policy would run every block for free) and divides by zero downstream, so
each block time is floored at MIN_BLOCK_FRACTION of its gate's program without
blocks (see `floor_block_times`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core.cost import CostTable
from quee_jax.runtime import program
from quee_jax.runtime.runner import Runner

# The floor of a block time, as a fraction of its gate's program without blocks (per sample,
# per block). Why that program: it is measured on its own (never a difference), so it is never
# ≤ 0, and its run-to-run jitter under load is a few percent of it — a block difference below
# ~1% of it cannot be told from 0. Why 1%: small enough not to tilt choices between real block
# times (a block is typically 10-100% of a head program), large enough that running a block is
# never free.
MIN_BLOCK_FRACTION = 0.01
# Paired repetitions at least: a median and a spread of fewer pairs say nothing.
MIN_PAIRS = 3

# A timer: seconds per sample of one call of the (gate, level) program, with or without blocks.
Timer = Callable[[int, int, bool], float]


@dataclasses.dataclass(frozen=True)
class LatencyModel:
  """A measured latency cost model and how sure it is.

  Attributes:
    costs: the cost table, normalized so the runner's full path is 1 (`CostTable`).
    spread: [num_blocks, levels] half the interquartile range of each block's paired
      differences, in the same normalization as `costs.blocks`.
    heads_spread: [num_gates] the same for each gate's program without blocks.
    floored: [num_blocks, levels] True where the median difference fell below the floor
      (MIN_BLOCK_FRACTION of the gate's program without blocks) and the floor was charged.
    pairs: paired repetitions per (gate, level).
  """

  costs: CostTable
  spread: np.ndarray
  heads_spread: np.ndarray
  floored: np.ndarray
  pairs: int


def chunk_timer(runner: Runner) -> Timer:
  """A `Timer` of the runner's chunk bodies (`program.chunk`) at its largest chunk, on its
  first device: per (gate, level, blocks) one jitted chunk over a lane of random inputs.

  The first call of each compiles and is not timed.
  """
  kind = program.QUEE
  batch = runner.max_batch
  spec = runner.spec(batch, kind)
  size = spec.max_chunk
  rng = np.random.default_rng(0)
  floating = np.issubdtype(runner.input_dtype, np.floating)
  # Token ids: 1, a valid non-padding id.
  imgs = (rng.normal(size=(batch, *runner.input_shape)) if floating
          else np.ones((batch, *runner.input_shape))).astype(runner.input_dtype)
  device = runner.devices[0]
  consts = jax.device_put(jax.device_get(runner.consts), device)
  fam = runner.family
  timed = {}

  def embedded_lane(consts: program.Consts, inputs: program.Inputs):
    # Chunks after gate 0 read the lane's hidden states: the inputs' embeddings, so that they
    # run on real activations (states of zeros would be all padding to a BERT attention mask).
    lane = program.start_lane(runner.backbone, spec, consts, inputs)
    h = runner.backbone.embed(consts.params, inputs.images)
    return lane._replace(hidden=lane.hidden.at[:batch].set(h.astype(lane.hidden.dtype)))

  def call(gate: int, level: int, blocks: bool) -> None:
    key = (gate, level, blocks)
    if key not in timed:
      state = np.full(batch, fam.states_at(gate)[0], np.int32)  # all in one state
      inputs = program.Inputs(imgs, state, np.zeros(batch, np.float32),
                              np.full((batch, fam.num_gates), np.inf, np.float32),
                              np.ones(batch, bool))
      lane = jax.jit(embedded_lane)(consts, jax.device_put(inputs, device))
      out = program.blank_gate(spec, consts)
      order = jnp.arange(batch + runner.min_chunk, dtype=jnp.int32)
      fn = jax.jit(functools.partial(program.chunk, runner.backbone, spec, gate=gate,
                                     level=level, size=size, blocks=blocks))
      args = (consts, lane, out, order, jnp.int32(0), jnp.int32(size))
      jax.block_until_ready(fn(*args))  # compiles
      timed[key] = (fn, args)
    fn, args = timed[key]
    jax.block_until_ready(fn(*args))

  def timer(gate: int, level: int, blocks: bool) -> float:
    if (gate, level, blocks) not in timed:
      call(gate, level, blocks)  # builds and compiles: not timed
    t0 = time.perf_counter()
    call(gate, level, blocks)
    return (time.perf_counter() - t0) / size
  return timer


def _half_iqr(x: np.ndarray) -> float:
  q1, q3 = np.percentile(x, [25, 75])
  return float(q3 - q1) / 2


def floor_block_times(diff: np.ndarray, head: float) -> tuple[np.ndarray, np.ndarray]:
  """(block times, floored mask): per-block median differences `diff` with each value below
  MIN_BLOCK_FRACTION × `head` (the gate's program without blocks, > 0) raised to it."""
  floor = MIN_BLOCK_FRACTION * head
  return np.maximum(diff, floor), diff < floor


def latency_model(runner: Runner, reps: int = 5, timer: Timer | None = None) -> LatencyModel:
  """The runner's own programs timed per sample on its first device, normalized like BOPs.

  For each gate g and level q, `max(reps, MIN_PAIRS)` pairs of calls: the (g, q) program and
  the same program without its blocks, back to back, the order alternating pair by pair, so
  load and drift hit both sides alike. blocks[i, q]: the median over pairs of (with − without)
  / blocks in the segment, floored (`floor_block_times`). heads[g]: the median of every call
  of the program without blocks at g: the exit head, features, predictor, gather and scatter,
  and at gate 0 the embedding (every path pays gate 0's once, so `embed` is 0). Normalized so
  that 1 is the runner's full path: every gate's program at the family's top level (by
  counted cost), as λ = 0 runs it. `timer` (default `chunk_timer(runner)`) times one call.
  """
  if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
    raise ValueError(f"reps: expected a positive int, got {reps!r}")
  timer = timer or chunk_timer(runner)
  fam = runner.family
  pairs = max(reps, MIN_PAIRS)
  bounds = (0,) + fam.exits
  nq = len(fam.ladder)
  heads, heads_spread = np.zeros(fam.num_gates), np.zeros(fam.num_gates)
  blocks, spread = np.zeros((fam.num_blocks, nq)), np.zeros((fam.num_blocks, nq))
  floored = np.zeros((fam.num_blocks, nq), bool)
  for g in range(fam.num_gates):
    without, diffs = [], np.zeros((nq, pairs))
    for q in range(nq):
      for r in range(pairs):
        # Without blocks the level does nothing: level 0's program, compiled once per gate.
        if r % 2:
          w, o = timer(g, q, True), timer(g, 0, False)
        else:
          o, w = timer(g, 0, False), timer(g, q, True)
        without.append(o)
        diffs[q, r] = w - o
    heads[g], heads_spread[g] = float(np.median(without)), _half_iqr(np.asarray(without))
    if not heads[g] > 0:
      raise ValueError(f"timer: gate {g}'s program without blocks took {heads[g]} s; expected > 0")
    n = bounds[g + 1] - bounds[g]
    seg, low = floor_block_times(np.median(diffs, axis=1) / n, heads[g])
    blocks[bounds[g]:bounds[g + 1]] = seg
    floored[bounds[g]:bounds[g + 1]] = low
    spread[bounds[g]:bounds[g + 1]] = [_half_iqr(d) / n for d in diffs]
  full = blocks[:, fam.top].sum() + heads.sum()  # the runner at λ = 0 runs every gate's program
  costs = CostTable(unit="seconds", float_bits=fam.costs.float_bits, ladder=fam.ladder, embed=0.0,
                    blocks=blocks / full, heads=heads / full, full_model=float(full))
  return LatencyModel(costs=costs, spread=spread / full, heads_spread=heads_spread / full,
                      floored=floored, pairs=pairs)


def latency_costs(runner: Runner, reps: int = 5) -> CostTable:
  """`latency_model(runner, reps).costs`: the cost table alone, for `Runner.with_costs`."""
  return latency_model(runner, reps).costs
