"""Real adaptive inference on raw inputs, and the check that a device computes every level.

  runner        Runner: runs only what the policy decides; Gating: a trained policy
  device_check  does an accelerator compute every precision level as the CPU does?
"""

from quee_jax.runtime import device_check, runner
from quee_jax.runtime.runner import Gating, Runner, RunResult, gating_from_fitted, latency_costs
