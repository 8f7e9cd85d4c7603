"""Latency cost model: a runner's own stage programs timed on the device at hand.

`latency_costs` turns the timings into a `CostTable` normalized like BOPs;
`Gating.with_costs` (or `Runner.with_costs`) makes it a policy whose ΔC is
time. The predictors are the same.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core.cost import CostTable
from quee_jax.runtime.runner import Runner
from quee_jax.runtime.stage import RowState


def time_stage(runner: Runner, gate: int, level: int, blocks: bool = True, reps: int = 5) -> float:
  """Seconds per sample of the (gate, level) program at the largest bucket on lane device 0.

  The fastest of `reps` calls (what the program costs when nothing else competes
  for the device). blocks=False: the program without the segment's blocks.
  """
  stage, b = runner.stage, runner.max_batch
  rng = np.random.default_rng(0)
  buffers = stage.zero_buffers(0)
  buffers = buffers._replace(hidden=jax.device_put(
      jnp.asarray(rng.normal(size=buffers.hidden.shape), buffers.hidden.dtype), runner.devices[0]))
  rows = np.arange(b, dtype=np.int32)
  state = RowState.start(np.full(b, runner.family.states_at(gate)[0]), b)  # all in one state
  imgs = None
  if gate == 0:  # token ids: 1, a valid non-padding id
    floating = np.issubdtype(runner.input_dtype, np.floating)
    imgs = (rng.normal(size=(b, *runner.input_shape)) if floating
            else np.ones((b, *runner.input_shape))).astype(runner.input_dtype)
  times = []
  for _ in range(reps + 1):  # the first call compiles
    t0 = time.perf_counter()
    buffers, out = stage(0, buffers, rows, imgs, state, gate=gate, level=level, blocks=blocks)
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
  heads = np.array([time_stage(runner, g, 0, blocks=False, reps=reps)
                    for g in range(fam.num_gates)])
  blocks = np.zeros((fam.num_blocks, len(fam.ladder)))
  for g in range(fam.num_gates):
    for q in range(len(fam.ladder)):
      seg = time_stage(runner, g, q, reps=reps) - heads[g]
      blocks[bounds[g]:bounds[g + 1], q] = max(seg, 0.0) / (bounds[g + 1] - bounds[g])
  full = blocks[:, fam.top].sum() + heads.sum()  # the runner at λ = 0 runs every gate's program
  return CostTable(unit="seconds", float_bits=fam.costs.float_bits, ladder=fam.ladder, embed=0.0,
                   blocks=blocks / full, heads=heads / full, full_model=float(full))
