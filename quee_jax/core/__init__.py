"""The vocabulary every later stage shares, independent of any model or dataset.

  precision    levels and ladders; the one quantization seam (AQT)
  backbone     the interface through which everything after the model sees it
  cost         MACs counted from jaxprs, BOPs, normalized cost tables
  paths        path families as tries of states, with candidates and their costs
  exit_stats   what an exit's softmax says about a sample (the per-state features)
  table        state tables: every state of a family on every sample, on disk
  checkpoints  orbax checkpoints that resume training, and start over where damaged
  progress     progress of a long loop on a terminal or in a log file
  hosts        the processes of a run: one, or one per host of a multi-host slice
"""

from quee_jax.core import (backbone, checkpoints, cost, exit_stats, hosts, paths, precision,
                           progress, table)
