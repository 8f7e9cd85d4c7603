"""Real adaptive inference on raw inputs, and the check that a device computes every level.

  runner        Runner: runs only what the policy decides; Gating: a trained policy
  lanes         the lane loop of Runner.classify: dispatch, collect, decide
  stage         the compiled program of one (gate, level, bucket); RowState, Buffers, StageOut
  latency       latency_costs: the runner's own programs timed, as a cost model
  device_check  does an accelerator compute every precision level as the CPU does?
"""

from quee_jax.runtime import device_check, lanes, latency, runner, stage
from quee_jax.runtime.latency import latency_costs
from quee_jax.runtime.runner import Gating, Runner, RunResult, gating_from_fitted
