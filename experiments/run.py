r"""The pipeline's entry point: `quee_jax.pipeline.run` on a config file.

  python -m experiments.run --config experiments/configs/fashion_mnist.py:demo --workdir /tmp/quee_demo
  python -m experiments.run --config experiments/configs/fashion_mnist.py --workdir /tmp/fm \
      --stages=tables,evaluate,report --config.eval.seeds=0,1,2

Stages, resuming and the config check: `quee_jax/pipeline/stages.py`. A bad
config value or flag stops the run with one `error:` line naming it.

Several hosts (a TPU VM slice, GPU hosts): run the same command on every host, with
`--multihost` (JAX detects the slice, SLURM or Open MPI) or with `--coordinator=HOST:PORT
--num_processes=N --process_id=I`; docs/multihost.md has the recipes. Process 0 writes the
work directory (which every host must see) and prints; the others print warnings and errors.
"""

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from quee_jax import pipeline
from quee_jax.core import hosts, precision
from quee_jax.runtime import device_check

if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).")
  flags.DEFINE_string("workdir", None, "Where checkpoints, tables and results go.")
  flags.DEFINE_list("stages", list(pipeline.STAGES), f"Stages to run, of {pipeline.STAGES}.")
  flags.DEFINE_bool("multihost", False, "One process of several: JAX detects the others"
                    " (a Cloud TPU slice, SLURM, Open MPI's mpirun, Kubernetes).")
  flags.DEFINE_string("coordinator", None, "One process of several: process 0's HOST:PORT.")
  flags.DEFINE_integer("num_processes", None, "With --coordinator: how many processes.")
  flags.DEFINE_integer("process_id", None, "With --coordinator: this process, 0..N-1.")
  flags.DEFINE_integer("heartbeat_timeout", 100, "Several processes: seconds a silent process"
                       " is waited for before the others stop.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    precision.avoid_triton_gemm()  # before jax starts: exact int8 dots on NVIDIA GPUs
    f = flags.FLAGS
    try:
      if f.multihost or f.coordinator or f.num_processes is not None or f.process_id is not None:
        hosts.initialize(f.coordinator, f.num_processes, f.process_id,
                         heartbeat_timeout_s=f.heartbeat_timeout)
    except ValueError as e:
      sys.exit(f"error: --{e}")
    logging.set_verbosity(logging.WARNING)  # orbax chatter; our progress lines stay
    if hosts.is_writer():
      pylogging.getLogger("quee_jax").setLevel(pylogging.INFO)
    else:  # one process tells the story; the others speak up for warnings and errors
      sys.stdout = open(os.devnull, "w")
    try:
      pipeline.run(f.config, f.workdir, f.stages)
    except (ValueError, device_check.DeviceMismatch, PermissionError) as e:
      # The message says what to change (PermissionError: a file in the work directory that
      # is not ours to write).
      hosts.abandon(f"error: {e}")

  def parse_flags(argv):
    try:
      rest = flags.FLAGS(argv)
      flags.FLAGS.config.to_dict()  # ml_collections defers a config file's load error to here
      return rest
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
      sys.exit(f"error: --config: no such key {str(e).strip(chr(34))} (check the override's spelling)")
    except (TypeError, ValueError, flags.Error) as e:
      sys.exit(f"error: {e}")
    except SyntaxError as e:
      sys.exit(f"error: --config: cannot load {config_path(argv)!r}: {e}")
    except OSError as e:  # ml_collections: a config file that does not load (many lines)
      why = str(e).strip().splitlines()[-1].strip()
      sys.exit(f"error: --config: cannot load {config_path(argv)!r}: {why}")

  def config_path(argv) -> str:
    """The --config flag's file, as given."""
    for i, a in enumerate(argv):
      if a.startswith("--config="):
        return a.split("=", 1)[1].split(":", 1)[0]
      if a == "--config" and i + 1 < len(argv):
        return argv[i + 1].split(":", 1)[0]
    return "?"

  app.run(main, flags_parser=parse_flags)
