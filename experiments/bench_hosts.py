r"""State-table collection: one process against several on the same machine, side by side.

  python -m experiments.run --config experiments/configs/fashion_mnist.py:demo --workdir /tmp/fm_demo
  python -m experiments.bench_hosts --workdir /tmp/fm_demo [--same_global_batch]

Runs `collect_table` with a finished work directory's trained model and family over
`--samples` inputs of its train split, as (a) one process with `--devices` CPU devices and
(b) `--processes` processes with `--devices` each, connected through JAX's distributed
runtime on the loopback address. On one machine the processes share its cores, each
confined to its own share as if it were a host, so (b) cannot be faster: the ratio is the
multi-process path's overhead (a batch split over more devices and processes, each batch's
outputs gathered across them). By default (b)'s global batch is `--processes` times (a)'s,
so every device gets as many rows; `--same_global_batch` gives both `--batch_size`. Each
setting times `--reps` whole passes after a compiling one (median).

Last line: JSON with each setting's samples/s and `overhead` = time (b) / time (a) - 1.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A work directory finished by experiments.run.")
flags.DEFINE_integer("samples", 3968, "Inputs per pass (from the work directory's train split).")
flags.DEFINE_integer("batch_size", 248, "Samples per batch of the one-process setting (a"
                     " multiple of --devices); the other's global batch is --processes times"
                     " it (as many rows per device) unless --same_global_batch.")
flags.DEFINE_bool("same_global_batch", False, "Give both settings the global batch --batch_size"
                  " (each device of the multi-process one then gets fewer rows).")
flags.DEFINE_integer("processes", 2, "Processes of the multi-process setting.")
flags.DEFINE_integer("devices", 2, "CPU devices of each process.")
flags.DEFINE_integer("reps", 3, "Timed passes (median reported).")
# Set by the script for the processes it starts.
flags.DEFINE_string("coordinator", None, "(internal) process 0's HOST:PORT.")
flags.DEFINE_integer("num_processes", 1, "(internal) processes of this setting.")
flags.DEFINE_integer("process_id", 0, "(internal) this process.")


def time_collection() -> dict:
  """In a started process: the work directory's collection timed (process 0 prints it)."""
  from quee_jax.core import hosts
  if FLAGS.num_processes > 1:
    hosts.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                     heartbeat_timeout_s=60)
  import jax

  from quee_jax import collect
  from quee_jax.pipeline import stages, workdir

  c, plan, tables = workdir.load_finished(FLAGS.workdir)
  splits = stages.config_splits(c, plan)
  if len(splits.train) < FLAGS.samples:
    raise ValueError(f"samples: the train split of {FLAGS.workdir!r} has {len(splits.train)}")
  # The finished checkpoints: restored, nothing trained.
  params = stages.trained_params(c, plan, splits, FLAGS.workdir, {})
  images, labels = splits.train.images[:FLAGS.samples], splits.train.labels[:FLAGS.samples]
  bb, family = plan.multi_exit, tables["test"].family
  run = lambda: collect.collect_table(bb, params, family, images, labels, FLAGS.batch_size,
                                      summary_dim=c.collect.summary_dim, progress=False)
  run()  # compiles
  times = []
  for _ in range(FLAGS.reps):
    hosts.barrier("start")  # every process starts a pass together
    t0 = time.perf_counter()
    table = run()
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  return {"processes": jax.process_count(), "devices": jax.device_count(),
          "batch_size": FLAGS.batch_size,
          "seconds": round(seconds, 3), "samples_per_s": round(len(labels) / seconds, 1),
          "states": family.num_states, "pred_checksum": int(table.pred.sum())}


def start(processes: int, devices: int, batch_size: int) -> dict:
  """Runs this script's timing in `processes` fresh processes; process 0's result."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  argv = [sys.executable, "-m", "experiments.bench_hosts", f"--workdir={FLAGS.workdir}",
          f"--samples={FLAGS.samples}", f"--batch_size={batch_size}",
          f"--reps={FLAGS.reps}", f"--num_processes={processes}",
          f"--coordinator=127.0.0.1:{port}"]
  cores = sorted(os.sched_getaffinity(0))
  share = lambda i: cores[i * len(cores) // processes:(i + 1) * len(cores) // processes]
  procs = [subprocess.Popen(argv + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a host of its own: its share of the cores (XLA sizes its
                            # thread pools to what the process may run on)
                            preexec_fn=lambda i=i: os.sched_setaffinity(0, share(i)))
           for i in range(processes)]
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      sys.exit(f"error: {processes} process(es) x {devices} devices failed:\n{err[-2000:]}")
  return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.coordinator is not None:  # a started process
    try:
      result = time_collection()
    except ValueError as e:  # a config or size that does not fit: the message names it
      sys.exit(f"error: {e}")
    if FLAGS.process_id == 0:
      print(json.dumps(result))
    return
  for name in ("samples", "batch_size", "processes", "devices", "reps"):
    if getattr(FLAGS, name) < 1:
      sys.exit(f"error: --{name}: expected >= 1, got {getattr(FLAGS, name)}")
  from quee_jax.pipeline import workdir
  try:  # before any process starts: a one-line error naming what is missing
    workdir.load_finished(FLAGS.workdir)
  except ValueError as e:
    sys.exit(f"error: {e}")
  global_batch = FLAGS.batch_size * (1 if FLAGS.same_global_batch else FLAGS.processes)
  if global_batch % (FLAGS.processes * FLAGS.devices):
    sys.exit(f"error: --batch_size: expected the global batch {global_batch} to split over"
             f" {FLAGS.processes * FLAGS.devices} devices")
  one = start(1, FLAGS.devices, FLAGS.batch_size)
  many = start(FLAGS.processes, FLAGS.devices, global_batch)
  if one["pred_checksum"] != many["pred_checksum"]:
    sys.exit("error: the two settings collected different predictions")
  overhead = many["seconds"] / one["seconds"] - 1
  print(f"collection of {FLAGS.samples} samples x {one['states']} states,"
        f" {len(os.sched_getaffinity(0))} CPU cores shared out among the processes:")
  for r in (one, many):
    print(f"  {r['processes']} process(es) x {r['devices'] // r['processes']} devices, batch"
          f" {r['batch_size']}: {r['seconds']:.2f} s/pass, {r['samples_per_s']:.0f} samples/s")
  print(f"multi-process overhead: {100 * overhead:+.1f}%")
  print(json.dumps({"one_process": one, "processes": many, "overhead": round(overhead, 4)}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
