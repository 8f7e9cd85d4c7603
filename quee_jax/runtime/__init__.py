"""Real adaptive inference on raw inputs, and the check that a device computes every level.

  gating        Gating: a trained policy (predictors, their level, family, τ)
  program       the device-resident program: a lane through every gate (compaction, level
                groups in chunks, predictor, decision) in one compiled call
  runner        Runner: lanes over the local devices, one transfer back per batch; QuEE
                (classify) and confidence exits (classify_confidence); a RunResult
  latency       latency_model / latency_costs: the runner's own chunk bodies timed, as a cost
                model (LatencyModel: the CostTable and each block time's spread)
  device_check  does an accelerator compute every precision level as the CPU does?
"""

from quee_jax.runtime import device_check, gating, latency, program, runner
from quee_jax.runtime.gating import Gating, gating_from_fitted
from quee_jax.runtime.latency import LatencyModel, latency_costs, latency_model
from quee_jax.runtime.runner import Runner, RunResult
