"""Orbax checkpoints that resume training, and start over where they are damaged.

A `CheckpointManager` saves {params, opt_state} every few steps; `restore`
returns the latest step's state, a ValueError naming the first parameter whose
shape differs from the model's, or - for a checkpoint that does not restore - a
one-line notice naming the directory and the fresh state, so training starts
over from scratch instead of ending in orbax's trace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from quee_jax.core import hosts
from quee_jax.core.progress import first_line, notice


def manager(directory: str, every: int) -> ocp.CheckpointManager:
  """The checkpoints in `directory` (absolute), saved every `every` steps, the last 2 kept."""
  # Naming the handler lets a fresh process read the metadata of old steps.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every),
      item_handlers=ocp.StandardCheckpointHandler())


def _key_name(path) -> str:
  # Dict keys, sequence indices and NamedTuple fields (optax states), as orbax names them.
  parts = (getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
  return "/".join(map(str, parts))


def check_shapes(restored_shapes: Any, template: Any, what: str) -> None:
  """Raises ValueError naming the first key whose shape or presence differs."""
  got = {_key_name(p): tuple(getattr(v, "shape", ())) for p, v in
         jax.tree_util.tree_flatten_with_path(restored_shapes)[0]}
  want = {_key_name(p): tuple(np.shape(v)) for p, v in
          jax.tree_util.tree_flatten_with_path(template)[0]}
  for key in sorted(set(got) | set(want)):
    if key not in got:
      raise ValueError(f"{what}: the checkpoint lacks {key!r} (expected shape {want[key]})")
    if key not in want:
      raise ValueError(f"{what}: the checkpoint has {key!r}, which the model does not")
    if got[key] != want[key]:
      raise ValueError(f"{what}: {key!r} has shape {got[key]} in the checkpoint,"
                       f" the model expects {want[key]}")


@contextlib.contextmanager
def _stderr_held() -> Iterator[list[bool]]:
  """Holds what is written to stderr (file descriptor 2) and replays it on exit, unless the
  body sets `drop[0] = True`.

  A damaged checkpoint fails one read while tensorstore's other reads still call back into
  a closed event loop, each printing a traceback from its own thread (no Python hook sees
  them); held at the descriptor, that noise is dropped with the failed restore.
  """
  drop, hook = [False], sys.unraisablehook
  sys.unraisablehook = lambda u: None if drop[0] else hook(u)  # e.g. a test runner's hook
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield drop
    finally:
      sys.unraisablehook = hook
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not drop[0]:
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def restore(mgr: ocp.CheckpointManager, state: Any, directory: str) -> tuple[Any, int]:
  """(state, step) of the latest checkpoint; (state as given, 0) if there is none or it is
  damaged (then with a notice, and its steps deleted)."""
  step = mgr.latest_step()
  if step is None:
    return state, 0
  with _stderr_held() as drop:
    try:
      metadata = mgr.item_metadata(step)["params"]
    except Exception as e:  # orbax raises many types for a damaged checkpoint
      return _start_over(mgr, state, directory, e, drop), 0
    # The optimizer state mirrors the params, so checking the params names the culprit.
    check_shapes(metadata, state["params"], f"checkpoint {directory}")
    try:
      return mgr.restore(step, args=ocp.args.StandardRestore(state)), step
    except Exception as e:
      return _start_over(mgr, state, directory, e, drop), 0


def _start_over(mgr: ocp.CheckpointManager, state: Any, directory: str, error: Exception,
                drop: list[bool]) -> Any:
  """Deletes the damaged steps in directory (keeping other files, e.g. the pipeline's stamp)
  so that training starts from scratch; returns the fresh state."""
  drop[0] = True
  notice(f"the checkpoint in {directory} does not restore ({first_line(error)[:200]});"
         " training this stage from scratch")
  if hosts.is_writer():  # every process found the same files damaged; one deletes them
    for name in os.listdir(directory):  # orbax names a step's directory by its number
      if name.isdigit() or ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  hosts.barrier(f"start over {os.path.basename(directory)}")
  mgr.reload()  # forget the deleted steps
  time.sleep(1.0)  # the pending reads end while their noise is held
  return state
