"""The experiment pipeline in a work directory: what `python -m experiments.run` runs.

  plan     the config checked before any work, as the library's typed settings
  workdir  what each stage wrote and with which config values (resume, redo); its lock
  stages   backbone -> exit heads -> state tables -> evaluation -> report
"""

from quee_jax.pipeline import plan, stages, workdir
from quee_jax.pipeline.plan import STAGES, Plan, make_plan
from quee_jax.pipeline.stages import config_splits, run, trained_params
from quee_jax.pipeline.workdir import load_finished, lock, made_with, stamps
