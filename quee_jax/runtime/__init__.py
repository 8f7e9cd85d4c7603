"""Real adaptive inference on raw inputs, and the check that a device computes every level.

  gating        Gating: a trained policy (predictors, their level, family, τ)
  stage         the compiled program of one (gate, level, bucket); RowState, Buffers, StageOut
  lanes         the lane loop of Runner.classify: dispatch, collect, decide
  runner        Runner: runs only what the policy decides, returns a RunResult
  latency       latency_model / latency_costs: the runner's own programs timed, as a cost
                model (LatencyModel: the CostTable and each block time's spread)
  device_check  does an accelerator compute every precision level as the CPU does?
"""

from quee_jax.runtime import device_check, gating, host, lanes, latency, program, runner, stage
from quee_jax.runtime.gating import Gating, gating_from_fitted
from quee_jax.runtime.latency import LatencyModel, latency_costs, latency_model
from quee_jax.runtime.host import HostRunner
from quee_jax.runtime.runner import Runner, RunResult
