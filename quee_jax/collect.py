"""Evaluates every state of a path family over a dataset: the state tables.

One jit-compiled function computes all states for a batch. States at a gate
that run their last segment at the same level are stacked and pushed through
the segment's blocks together (a `vmap` over states), each from its parent's
hidden state, so shared prefixes are computed once and the program holds
gates x levels block calls rather than one per state. Because activations are
quantized per token, stacking states and samples changes no sample's result.

On a CPU a block slows down about 2x per row once a call holds more than ~512
rows (samples x states) as the working set leaves the cache, so there the
stacked states run in chunks of about `rows_per_call` rows (a `lax.map`);
accelerators take each stack in one call.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from quee_jax.core import hosts
from quee_jax.core.backbone import Backbone, ByIdentity, Params
from quee_jax.core.exit_stats import FEATURES, softmax_features, summary_projection
from quee_jax.core.paths import PathFamily
from quee_jax.core.progress import Progress
from quee_jax.core.table import StateTable

log = logging.getLogger(__name__)


def default_rows_per_call() -> int:
  """Rows (samples x states) per block call: 256 on CPU, unbounded elsewhere."""
  return 256 if jax.default_backend() == "cpu" else 2**31


def state_outputs(backbone: Backbone, family: PathFamily, params: Params, inputs: jax.Array,
                  rows_per_call: int | None = None, summary_dim: int = 0
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Every state of `family` for a batch.

  Returns:
    logits [num_states, batch, classes], and when summary_dim > 0 (and the
    backbone has a `summary`) a fixed random projection of each state's exit
    summary, [num_states, batch, summary_dim]; else None.

  rows_per_call: chunk each stack of states so a block call holds about this
    many samples x states (None: `default_rows_per_call()`).
  """
  if rows_per_call is None:
    rows_per_call = default_rows_per_call()
  _check_family(backbone, family)
  bounds = (0,) + family.exits
  h0 = backbone.embed(params, inputs)

  def run_segment(h, gate, q):
    # h: [n_states, batch, ...]; every block of the segment at level q.
    def segment(x):
      for i in range(bounds[gate], bounds[gate + 1]):
        x = backbone.block(params, i, x, family.ladder[q])
      return x
    chunk = max(1, rows_per_call // h.shape[1])
    if chunk >= h.shape[0]:
      return jax.vmap(segment)(h)
    return jax.lax.map(segment, h, batch_size=chunk)

  want_summary = summary_dim > 0 and backbone.summary is not None
  logits, summaries, hidden, offset = [], [], None, 0
  for gate in range(family.num_gates):
    states = family.states_at(gate)
    groups = []
    for q in np.unique(family.level[states]):  # contiguous by construction
      members = states[family.level[states] == q]
      if gate == 0:
        h = h0[None]
      else:  # static gather of the parents' hidden states
        h = hidden[family.parent[members] - offset]
      groups.append(run_segment(h, gate, int(q)))
    offset = states[0]
    hidden = jnp.concatenate(groups) if len(groups) > 1 else groups[0]
    logits.append(jax.vmap(lambda x, g=gate: backbone.exit_head(params, g, x))(hidden))
    if want_summary:
      summary = jax.vmap(lambda x, g=gate: backbone.summary(params, g, x))(hidden)
      proj = summary_projection(summary.shape[-1], summary_dim)
      summaries.append(summary.astype(jnp.float32) @ proj)
  return jnp.concatenate(logits), (jnp.concatenate(summaries) if want_summary else None)


def make_collect_fn(backbone: Backbone, family: PathFamily, keep_logits: bool = False,
                    rows_per_call: int | None = None, summary_dim: int = 0
                    ) -> Callable[[Params, jax.Array, jax.Array], dict[str, jax.Array]]:
  """A function (params, inputs [B, ...], labels [B]) -> per-state outputs [S, B].

  Outputs: pred (int32), correct (bool), every name in FEATURES (float32),
  logits [S, B, C] when keep_logits, summary [S, B, summary_dim] when asked.
  Not jitted: `collect_table` jits it with the shardings of its device mesh.
  rows_per_call, summary_dim: see `state_outputs`.
  """
  parent = np.maximum(family.parent, 0)
  is_root = (family.parent < 0)[:, None]

  def fn(params, inputs, labels):
    logits, summary = state_outputs(backbone, family, params, inputs, rows_per_call, summary_dim)
    feats = softmax_features(logits, logits[parent])
    feats["kl_parent"] = jnp.where(is_root, 0.0, feats["kl_parent"])
    feats["agree_parent"] = jnp.where(is_root, 1.0, feats["agree_parent"])
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = {"pred": pred, "correct": pred == labels[None, :], **feats}
    if keep_logits:
      out["logits"] = logits.astype(jnp.float32)
    if summary is not None:
      out["summary"] = summary
    return out

  return fn


def padded_batches(inputs: np.ndarray, labels: np.ndarray, batch_size: int,
                   rows: slice = slice(None)) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Fixed-size batches; the last is zero-padded. Yields (inputs, labels, n_valid).

  rows: read only these rows of every batch (a process's block of a global batch); the
  yielded arrays are that block, n_valid counts the valid samples of the whole batch.
  """
  n = len(labels)
  lo, hi, _ = rows.indices(batch_size)
  for start in range(0, n, batch_size):
    end = min(start + hi, n)
    x = np.asarray(inputs[min(start + lo, end):end])
    y = np.asarray(labels[min(start + lo, end):end])
    short = hi - lo - len(y)
    if short:
      x = np.concatenate([x, np.zeros((short, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros((short,), y.dtype)])
    yield x, y, min(batch_size, n - start)


def _check_family(backbone: Backbone, family: PathFamily) -> None:
  if tuple(family.exits) != tuple(backbone.exits):
    raise ValueError(f"family: built for exits {family.exits}, the backbone has {backbone.exits}")


def _checked_labels(inputs, labels, num_classes: int) -> np.ndarray:
  """labels as an array; ValueError unless they are one int in [0, num_classes) per input."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: expected a 1-D integer array, got {labels.dtype}{list(labels.shape)}")
  if len(inputs) != len(labels):
    raise ValueError(f"inputs: {len(inputs)} samples but labels has {len(labels)}")
  if len(labels) == 0:
    raise ValueError("inputs: expected at least one sample, got none")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels: expected values in [0, {num_classes}),"
                     f" got [{labels.min()}, {labels.max()}]")
  return labels


@functools.lru_cache(maxsize=8)
def _collect_step(backbone: ByIdentity, family: ByIdentity, keep_logits: bool,
                  rows_per_call: int, summary_dim: int, devices: tuple):
  """(jitted collection step, unpacking of its output, the shardings of the params and of a
  batch): one per model, family, settings and devices, so that the fit, cal and test tables
  (and a benchmark's passes) compile it once."""
  mesh = hosts.mesh(list(devices))
  replicated, by_sample = hosts.data_shardings(mesh)
  per_state = hosts.output_sharding(mesh, P(None, "batch"))
  rows_per_call *= len(devices)  # the chunk is sized on each device's shard
  fn = make_collect_fn(backbone.value, family.value, keep_logits, rows_per_call, summary_dim)
  packed, unpack = _packing(fn)
  step = jax.jit(packed, in_shardings=(replicated, by_sample, by_sample),
                 out_shardings=per_state)
  return step, unpack, replicated, by_sample


def _packing(fn):
  """(fn with its outputs packed into one float32 array [S, B, K], the numpy unpacking).

  A mesh over several processes gathers a step's outputs to every process: one array
  gathers in one collective, where each of eight outputs would add a collective's latency
  to every batch. Every output is exact in float32 (int32 class indices < 2^24, booleans).
  """
  layout = []  # (name, dtype, width or 0 for [S, B]), recorded when jit traces fn

  def packed(params, inputs, labels):
    out = fn(params, inputs, labels)
    layout[:] = [(k, v.dtype, v.shape[2] if v.ndim == 3 else 0) for k, v in sorted(out.items())]
    return jnp.concatenate([(v[..., None] if v.ndim == 2 else v).astype(jnp.float32)
                            for _, v in sorted(out.items())], axis=-1)

  def unpack(a: np.ndarray) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, dtype, width in layout:
      part = a[..., at:at + max(width, 1)]
      out[name] = (part if width else part[..., 0]).astype(dtype)
      at += max(width, 1)
    return out

  return packed, unpack


def collect_table(backbone: Backbone, params: Params, family: PathFamily,
                  inputs: np.ndarray, labels: np.ndarray, batch_size: int = 128, *,
                  keep_logits: bool = False, devices: list | None = None,
                  rows_per_call: int | None = None, summary_dim: int = 8,
                  progress: bool = True, meta: dict | None = None) -> StateTable:
  """Streams a dataset through every state of `family`; returns the state table.

  Args:
    backbone: the multi-exit model.
    params: its parameters.
    family: the path family (built for this backbone's exits and costs).
    inputs: [N, ...] model inputs (numpy or anything sliceable to numpy).
    labels: [N] integer labels.
    batch_size: samples per step; a multiple of the number of devices. The last
      batch is padded, so the function compiles once.
    keep_logits: also keep every state's logits ([S, N, C] float32).
    devices: devices to shard each batch over (default: `hosts.devices()`, every device of
      every process; under several processes each reads its own block of every batch and
      every process gets the whole table).
    rows_per_call: samples x states per block call on each device (None:
      `default_rows_per_call()`); a speed knob, results do not depend on it.
    summary_dim: keep this many dimensions of a fixed random projection of each
      state's exit summary (0: none; ignored for backbones without `summary`).
    progress: show progress: a bar on terminals, else a log line every ~10% or minute.
    meta: extra JSON-serializable metadata stored with the table (e.g. dataset).
  """
  _check_family(backbone, family)
  labels = _checked_labels(inputs, labels, backbone.num_classes)
  devices = list(devices) if devices is not None else hosts.devices()
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  if batch_size % len(devices):
    raise ValueError(f"batch_size: must be a multiple of the {len(devices)} devices,"
                     f" got {batch_size}")

  if rows_per_call is None:
    rows_per_call = default_rows_per_call()
  if isinstance(rows_per_call, bool) or not isinstance(rows_per_call, int) or rows_per_call < 1:
    raise ValueError(f"rows_per_call: expected a positive int or None, got {rows_per_call!r}")
  if isinstance(summary_dim, bool) or not isinstance(summary_dim, int) or summary_dim < 0:
    raise ValueError(f"summary_dim: expected a non-negative int, got {summary_dim!r}")
  step, unpack, replicated, by_sample = _collect_step(
      ByIdentity(backbone), ByIdentity(family), keep_logits, rows_per_call, summary_dim,
      tuple(devices))
  params = jax.device_put(params, replicated)

  chunks: list[dict[str, np.ndarray]] = []
  pending = None  # dispatch batch k+1 before copying batch k to the host

  def fetch(out_valid):
    out, valid = out_valid
    chunks.append(unpack(hosts.to_host(out)[:, :valid]))

  num_batches = -(-len(labels) // batch_size)
  mine = hosts.local_rows(by_sample, batch_size)
  # A bar on terminals, periodic log lines otherwise (a log file shows no bar).
  with Progress(num_batches, f"collect {family.name}", unit="batch",
                enabled=progress and hosts.is_writer(),
                logger=log) as bar:
    for x, y, valid in padded_batches(inputs, labels, batch_size, mine):
      out = step(params, hosts.global_batch(x, by_sample, batch_size),
                 hosts.global_batch(y, by_sample, batch_size))
      if pending is not None:
        fetch(pending)
        bar.update(1)
      pending = (out, valid)
    fetch(pending)
    bar.update(1)

  cat = {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}
  return StateTable(
      family=family, labels=labels.astype(np.int32), pred=cat["pred"], correct=cat["correct"],
      features={name: cat[name] for name in FEATURES}, logits=cat.get("logits"),
      summary=cat.get("summary"),
      backbone=dict(backbone.config), meta=dict(meta or {}))
