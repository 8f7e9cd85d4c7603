"""The processes of a run: one by default, one per host on a multi-host slice.

JAX's multi-controller model runs the same program in one Python process per host;
`jax.distributed.initialize` connects them, after which `jax.devices()` lists every
device of every host and a jit over a mesh of them is one program across hosts. This
module is the little the pipeline needs on top of that:

  initialize    connect the processes (explicit coordinator, or the environment's
                detection on TPU slices, SLURM, Open MPI); a single process calls nothing
  mesh          a 1-D data-parallel mesh, devices in process order, so that process p
                holds the p-th contiguous block of every batch (`local_rows`); its
                `data_shardings`
  global_batch  a global array from the rows this process read
  to_host       a global array as a numpy array on every process (`output_sharding`:
                a step's outputs, gathered inside the step where processes share a mesh)
  is_writer,    one process writes each file; the others wait at a barrier until it is
  barrier,      there; what to redo is process 0's decision on every process (`agree`)
  agree

With one process every function here is the single-host path itself: the mesh is the
local devices, a process's rows are the whole batch, barriers return at once.

If a process dies, JAX's coordination service stops the others within the heartbeat
timeout ("Terminating process because the JAX distributed service detected fatal
errors ... another task died"); a process that stops on an error of its own exits at
once without the shutdown handshake (`abandon`), so the others stop the same way
rather than wait for it.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quee_jax.core.progress import first_line

BARRIER_TIMEOUT_S = 24 * 3600  # a wait for the writer's stage (evaluation can take hours)
_barriers = itertools.count()


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int = 100) -> None:
  """Connects this process to the others of a multi-process run; call before any JAX work.

  Either all of coordinator ('host:port' of process 0), num_processes and process_id, or
  none of them: then JAX detects the cluster from the environment (a Cloud TPU slice,
  SLURM, Open MPI's mpirun, Kubernetes, mpi4py).
  heartbeat_timeout_s: how long a silent process is waited for before every other one
  stops.
  """
  given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if 0 < len(missing) < 3:
    raise ValueError(f"{missing[0]}: give coordinator, num_processes and process_id together"
                     " (or none of them, to detect the cluster)")
  if coordinator is not None:
    if num_processes < 1:
      raise ValueError(f"num_processes: expected >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id: expected in [0, {num_processes}), got {process_id}")
    if ":" not in coordinator:
      raise ValueError(f"coordinator: expected 'host:port', got {coordinator!r}")
  if heartbeat_timeout_s < 1:
    raise ValueError(f"heartbeat_timeout: expected >= 1 second, got {heartbeat_timeout_s}")
  # CPU devices of several processes talk through gloo (the default has no cross-process
  # collectives); the setting is read by the CPU client only, so accelerators ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               shutdown_timeout_seconds=heartbeat_timeout_s)
  except Exception as e:  # jax raises RuntimeError, ValueError or its runtime's error
    key = "coordinator" if coordinator is not None else "multihost"
    raise ValueError(f"{key}: could not join the other processes ({first_line(e)[:300]})"
                     ) from None


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process is here (nothing to wait for with one process)."""
  if jax.process_count() == 1:
    return
  # The coordination service's barrier rather than a device collective: a wait for the
  # writer's evaluation may be long, and the heartbeats still catch a dead process.
  import orbax.checkpoint as ocp  # the maintained wrapper of JAX's distributed client
  ocp.multihost.get_barrier_sync_fn()(key=f"quee_jax:{name}:{next(_barriers)}",
                                      timeout_ms=BARRIER_TIMEOUT_S * 1000)


def agree(decision: bool) -> bool:
  """Process 0's decision, on every process (a collective: every process must call it).

  Where each process decides from the files it reads (is this output done?), process 0
  could rewrite a file before a slower process reads it, or a network filesystem show a
  process an older view: processes that decided differently would then wait at different
  collectives forever. Every process acts on what process 0 read, and none goes on before
  all have read.
  """
  if jax.process_count() == 1:
    return decision
  return bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))


def abandon(message: str, code: int = 1) -> None:
  """Prints message to stderr and ends the process; with several processes, without the
  shutdown handshake (which would wait for processes that wait for this one)."""
  print(message, file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    sys.stdout.flush()
    os._exit(code)
  sys.exit(code)


def devices() -> list:
  """Every device of every process, in process order (the local devices with one process)."""
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def mesh(devices_: list | None = None) -> Mesh:
  """A 1-D mesh with axis 'batch' over devices_ (default: `devices()`)."""
  return Mesh(np.array(devices() if devices_ is None else devices_), ("batch",))


def data_shardings(mesh_: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(whole on every device, split by rows): where the parameters and a batch go."""
  return NamedSharding(mesh_, P()), NamedSharding(mesh_, P("batch"))


def local_rows(sharding: NamedSharding, rows: int) -> slice:
  """The rows of a [rows, ...] batch sharded by `sharding` that this process holds (one
  contiguous block: the mesh lists devices in process order)."""
  spans = sorted((s[0].start or 0, rows if s[0].stop is None else s[0].stop)
                 for s in sharding.addressable_devices_indices_map((rows,)).values())
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in {s: None for s in spans})
  if covered != stop - start:
    raise ValueError("mesh: this process's devices do not hold one block of rows; build the"
                     " mesh with hosts.mesh()")
  return slice(start, stop)


def global_batch(local: np.ndarray, sharding: NamedSharding, rows: int) -> jax.Array:
  """The [rows, ...] global array whose block on this process is `local`."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, (rows, *local.shape[1:]))


def output_sharding(mesh_: Mesh, spec: P) -> NamedSharding:
  """Where a step's outputs go so that every process reads them whole: laid out by `spec`
  on one process's devices (the host assembles the shards), replicated on a mesh that
  spans processes (XLA gathers them inside the step: one program per batch rather than
  a gathering program per output afterwards, several times slower on CPU hosts)."""
  spans = len({d.process_index for d in mesh_.devices.flat}) > 1
  return NamedSharding(mesh_, P() if spans else spec)


def to_host(tree: Any) -> Any:
  """Every array of tree as a numpy array, whole on every process (a collective for arrays
  sharded across processes: every process must call it with the same tree)."""
  def whole(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)  # here already (with one process, always)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(whole, tree)
