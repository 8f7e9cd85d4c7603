"""The compiled program of one (gate, level, bucket), and the typed values it reads and returns.

A stage program takes one level group of a lane at one gate: the group's rows
are gathered out of the lane's buffers (or embedded from the raw inputs at gate
0), run through the segment's blocks at the group's level, the exit head, the
softmax statistics, the predictor features and the error predictor. What a row
needs from the host besides its hidden state comes as a `RowState`, a pytree of
named arrays, so no column of a packed matrix has a meaning by position.

Programs are keyed by (gate, level, bucket) (and `blocks`, which only the
latency model turns off), so their number is bounded by gates x levels x
buckets whatever the data.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.exit_stats import softmax_features, summary_projection
from quee_jax.gating import features, predictor
from quee_jax.runtime.gating import Gating


class RowState(NamedTuple):
  """Per row, what a stage program needs from the host besides the row's hidden state.

  Host-side numpy arrays. A lane keeps one row per sample and a spare last row,
  as its `Buffers` do; `take` gathers a group's rows, its padding pointing at
  the spare row (padding outputs are dropped).
  """

  parent_stats: np.ndarray  # [n, 3] float32: the previous exit's max_prob, margin, entropy
  anc_pred: np.ndarray      # [n] int32: prediction at the last exit before the path's level
                            # switch; -1 while the path has not switched
  anc_max_prob: np.ndarray  # [n] float32: that exit's max prob
  state: np.ndarray         # [n] int32: the row's current state in the family

  @classmethod
  def start(cls, states: np.ndarray, n: int) -> "RowState":
    """n rows: the first len(states) at these states before any exit, the rest spare."""
    state = np.zeros(n, np.int32)
    state[:len(states)] = states
    return cls(np.zeros((n, 3), np.float32), np.full(n, -1, np.int32), np.zeros(n, np.float32),
               state)

  def take(self, rows: np.ndarray) -> "RowState":
    """The rows `rows`, as new arrays: a queued program may still read them when the host
    updates the lane's own."""
    return type(self)(*(a[rows] for a in self))


class Buffers(NamedTuple):
  """A lane slot's device state, one row per sample of its lane and a spare for the padding."""

  hidden: jax.Array       # [max_batch + 1, ...] hidden state after the last segment run
  last_logits: jax.Array  # [max_batch + 1, C] float32 logits of the last exit taken


class StageOut(NamedTuple):
  """What a stage program returns per row (of its bucket: the first m rows are the group)."""

  pred: jax.Array      # [b] int32 predicted class at this exit
  max_prob: jax.Array  # [b] float32 exit statistics (`softmax_features`)
  margin: jax.Array    # [b]
  entropy: jax.Array   # [b]
  errors: jax.Array | None  # [b, C] predicted errors of the candidates; None at the last gate


def program(backbone: Backbone, exits: tuple[int, ...], ladder: precision.Ladder,
            predictor_level: precision.Level, consts, buffers: Buffers, rows, images,
            state: RowState, *, gate: int, level: int, blocks: bool = True
            ) -> tuple[Buffers, StageOut]:
  """One group at one gate: [embed,] segment, exit, features, predicted errors.

  consts: (backbone params, predictor MLP, summary projection or None,
  `features.state_onehots` [S, O]) on the lane's device. rows [b]: the group's
  rows in `buffers` (padding rows point at the spare last row). images [b, ...]:
  the raw inputs at gate 0, else None. state: the group's `RowState` [b].
  """
  params, mlp, proj, onehots = consts
  bounds = (0,) + tuple(exits)
  h = backbone.embed(params, images) if gate == 0 else buffers.hidden[rows]
  if blocks:
    for i in range(bounds[gate], bounds[gate + 1]):
      h = backbone.block(params, i, h, ladder[level])
  logits = backbone.exit_head(params, gate, h)
  stats = softmax_features(logits, None if gate == 0 else buffers.last_logits[rows])
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = StageOut(pred, stats["max_prob"], stats["margin"], stats["entropy"], None)
  if gate == len(exits) - 1:  # the last gate always exits: no predictor, nothing to keep
    return buffers, out
  buffers = Buffers(buffers.hidden.at[rows].set(h.astype(buffers.hidden.dtype)),
                    buffers.last_logits.at[rows].set(logits.astype(jnp.float32)))
  summary = None
  if proj is not None:
    summary = backbone.summary(params, gate, h).astype(jnp.float32) @ proj
  x = features.assemble(stats, state.parent_stats, state.anc_pred, state.anc_max_prob,
                        state.anc_pred >= 0, pred, summary, onehots[state.state])
  errors = jax.nn.sigmoid(predictor.logits(mlp, x, gate, predictor_level))
  return buffers, out._replace(errors=errors)


class Stage:
  """A runner's stage programs (compiled on first use), and the constants they read.

  Args:
    backbone, params: the multi-exit model.
    gating: the trained policy: its predictors, their level, and its family's exits and
      ladder (not its costs, which only the host's decisions use).
    input_shape, input_dtype: one raw input.
    max_batch: rows per lane (the buffers hold one more, for the padding).
    devices: the lane devices; the constants are copied onto each.
  """

  def __init__(self, backbone: Backbone, params: Params, gating: Gating, *,
               input_shape: tuple[int, ...], input_dtype: np.dtype, max_batch: int,
               devices: Sequence):
    family = gating.family
    self.backbone, self.devices, self.max_batch = backbone, list(devices), max_batch
    x1 = jax.ShapeDtypeStruct((1, *input_shape), input_dtype)
    h1 = jax.eval_shape(backbone.embed, params, x1)
    self._hidden = (h1.shape[1:], h1.dtype)
    proj = None
    if gating.summary_dim:
      width = jax.eval_shape(lambda p, h: backbone.summary(p, 0, h), params, h1).shape[-1]
      proj = summary_projection(width, gating.summary_dim)
    mlp = {k: gating.predictor[k] for k in predictor.MLP_KEYS}  # not the calibration
    onehots = features.state_onehots(family)
    self._consts = [jax.device_put((params, mlp, proj, onehots), d) for d in self.devices]
    # `program` is looked up here, not at import, so that tests can wrap it (chex).
    fn = functools.partial(program, backbone, tuple(family.exits), family.ladder,
                           gating.predictor_level)
    self._run = jax.jit(fn, static_argnames=("gate", "level", "blocks"),
                        donate_argnames=("buffers",))

  def __call__(self, device: int, buffers: Buffers, rows: np.ndarray, images: np.ndarray | None,
               state: RowState, *, gate: int, level: int, blocks: bool = True
               ) -> tuple[Buffers, StageOut]:
    """Queues the (gate, level, len(rows)) program on lane device `device` (does not wait).

    The buffers are donated: use the returned ones.
    """
    return self._run(self._consts[device], buffers, rows, images, state, gate=gate, level=level,
                     blocks=blocks)

  def zero_buffers(self, device: int) -> Buffers:
    """Fresh buffers for a lane slot on lane device `device`."""
    hid_shape, hid_dtype = self._hidden
    rows = self.max_batch + 1  # the last row takes the padding
    dev = self.devices[device]
    return Buffers(jnp.zeros((rows, *hid_shape), hid_dtype, device=dev),
                   jnp.zeros((rows, self.backbone.num_classes), jnp.float32, device=dev))

