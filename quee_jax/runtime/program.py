"""The device-resident program: a batch through every gate in one jit-compiled call.

For a lane of B samples (one per device) the program takes, at each gate g
that any sample of the lane still reaches (a lane whose samples all left skips
the rest):
  1. compacts: a stable sort of the samples by (done, level of their next
     segment) puts each level's still-running samples in one contiguous range
     of an index vector; done samples sort last;
  2. runs each level's group in chunks: the group's n rows, rounded up to the
     smallest chunk m (`min_chunk`), run as many chunks of the largest size M
     (`max_chunk`) as fit, in a loop, then the rest by its binary
     decomposition: one chunk of m * 2^k rows for every set bit k, each run
     only if needed. A chunk gathers its rows (at gate 0 their raw inputs, and
     embeds them), runs the segment's blocks at the level, the exit head, the
     softmax statistics and (QuEE) the features and the error predictor, and
     scatters the results back. Padding is under m rows per group, never a
     sample dropped, and the compiled chunk bodies number gates x levels x
     (log2(M / m) + 1) whatever the data;
  3. decides, masked and vectorized over the lane: `policy.step` (xp=jax.numpy:
     the function the simulation decides with) for QuEE, or confidence
     thresholds for the baselines; the last gate always exits.
The lane's exit states and predictions, with the rows computed and needed,
come back to the host once per batch. No Python depends on the data, so a new
batch of the same shape compiles nothing.

Why a loop of the largest chunk and the binary decomposition of the rest, and
not padded buckets (the earlier host-driven runner padded each group to the
next of x1.5/x2 steps, 16% extra rows on the Fashion-MNIST demo) or a loop over
chunks of one size (small chunks waste an accelerator, large ones pad up to a
chunk per group): it pads less than m rows per group with log2(M / m) + 1
sizes, and M can be set where the device runs fastest (on 2 CPU cores MiniLM
runs about 2x faster per row in chunks of 32 than of 256: XLA touches each call's
temporaries afresh, and they grow with the chunk). docs/results/runtime.md has
the measurements.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.core import precision
from quee_jax.core.backbone import Backbone, Params
from quee_jax.core.exit_stats import softmax_features, summary_projection
from quee_jax.core.paths import PathFamily
from quee_jax.gating import features, policy, predictor
from quee_jax.runtime.gating import Gating

QUEE, CONFIDENCE = "quee", "confidence"  # the two kinds of decision a program takes


class Inputs(NamedTuple):
  """Per sample of a lane (device arrays, [B] or [B, ...]): what the host sends."""

  images: jax.Array      # [B, ...] raw inputs
  start: jax.Array       # [B] int32 root state (block 1's level)
  lam: jax.Array         # [B] float32 λ (QuEE)
  thresholds: jax.Array  # [B, G] float32: exit at gate g if max prob >= it (confidence; the
                         # last column is unused: the last gate always exits)
  live: jax.Array        # [B] bool: a real sample (False: padding of a short batch)


class Output(NamedTuple):
  """What comes back, per lane: per sample, and the block rows computed and needed."""

  exit_state: jax.Array    # [B] int32 the family's state at the exit taken
  pred: jax.Array          # [B] int32 the prediction there
  rows_computed: jax.Array  # [1] int32 rows pushed through segments, padding included
  rows_needed: jax.Array    # [1] int32 rows of samples that ran a segment


class Consts(NamedTuple):
  """What every call reads, on every device: the model, the predictor and the family's arrays."""

  params: Params
  mlp: Params | None          # the predictor's network (QuEE)
  shrink: dict | None         # its "shrink" calibration, if any
  proj: jax.Array | None      # the exit summary's projection, if the predictor reads one
  onehots: jax.Array          # [S, O] `features.state_onehots`
  level: jax.Array            # [S] int32 the level of each state's segment
  anc_changes: jax.Array      # [S] bool: the path switched level into this state
  decision: policy.Decision   # cand_cost (ΔC: the cost model), cand_mask, reference, child


class _Lane(NamedTuple):
  """A lane's state between gates, B + 1 rows: the last is a spare that padding rows of a
  chunk read and write (its values mean nothing)."""

  images: jax.Array        # [B+1, ...] raw inputs, embedded by gate 0's chunks
  hidden: jax.Array        # [B+1, ...] hidden state after the last segment run
  last_logits: jax.Array   # [B+1, C] logits of the last exit taken
  state: jax.Array         # [B+1] int32 current state
  parent_stats: jax.Array  # [B+1, 3] the previous exit's max_prob, margin, entropy
  anc_pred: jax.Array      # [B+1] int32 prediction before the path's switch; -1 before one
  anc_max_prob: jax.Array  # [B+1] that exit's max prob
  done: jax.Array          # [B+1] bool: exited (or padding)
  exit_state: jax.Array    # [B+1] int32, -1 while running
  exit_pred: jax.Array     # [B+1] int32


class _Gate(NamedTuple):
  """What the current gate's chunks computed, per row (B + 1 rows)."""

  pred: jax.Array          # [B+1] int32
  stats: jax.Array         # [B+1, 3] max_prob, margin, entropy
  errors: jax.Array | None  # [B+1, C] predicted errors (QuEE, not at the last gate)


def _pad(a: jax.Array, fill) -> jax.Array:
  """a with one more row (the spare) of `fill`."""
  return jnp.concatenate([a, jnp.full((1, *a.shape[1:]), fill, a.dtype)])


def _when(pred: jax.Array, fn, carry):
  """fn(carry) if pred else carry, as a `lax.while_loop` of at most one trip.

  Why not `lax.cond`: XLA on CPU copied the lane's hidden states (25 MB for a MiniLM lane of
  256) in and out of conditionals, taken or not, and a skipped chunk or gate cost a
  millisecond or more each; a loop updates its carried buffers in place.
  """
  return jax.lax.while_loop(lambda c: c[0], lambda c: (False, fn(c[1])), (pred, carry))[1]


def chunk_sizes(batch: int, min_chunk: int, max_chunk: int | None = None) -> tuple[int, ...]:
  """The chunk sizes a lane of `batch` rows uses, largest first: min_chunk * 2^k for every k
  with 2^k <= ceil(batch / min_chunk) and min_chunk * 2^k <= max_chunk (>= min_chunk)."""
  units = -(-batch // min_chunk)
  if max_chunk is not None:
    units = min(units, max_chunk // min_chunk)
  return tuple(min_chunk << k for k in reversed(range(units.bit_length())))


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static shape of a program (its compile-time constants)."""

  exits: tuple[int, ...]
  ladder: precision.Ladder
  predictor_level: precision.Level
  levels_at: tuple[tuple[int, ...], ...]  # per gate, the levels a segment there may run at
  batch: int                              # B: samples per lane
  min_chunk: int
  max_chunk: int                          # the largest chunk: a group runs as many as fit
  tau: float
  kind: str                               # QUEE or CONFIDENCE


def spec_for(gating: Gating, batch: int, min_chunk: int, max_chunk: int, kind: str) -> Spec:
  fam = gating.family
  levels_at = tuple(tuple(sorted({int(q) for q in fam.level[fam.states_at(g)]}))
                    for g in range(fam.num_gates))
  return Spec(tuple(fam.exits), fam.ladder, gating.predictor_level, levels_at, batch, min_chunk,
              chunk_sizes(batch, min_chunk, max_chunk)[0], float(gating.tau), kind)


def make_consts(backbone: Backbone, params: Params, gating: Gating, summary_width: int | None
                ) -> Consts:
  """The `Consts` of a gating (host arrays; the runner puts them on its devices)."""
  fam = gating.family
  proj = summary_projection(summary_width, gating.summary_dim) if gating.summary_dim else None
  mlp = {k: gating.predictor[k] for k in predictor.MLP_KEYS}  # not the calibration
  shrink = gating.predictor.get("shrink")
  anc_changes = fam.level[np.maximum(fam.parent, 0)] != fam.level
  return Consts(params, mlp, shrink, proj, features.state_onehots(fam),
                fam.level.astype(np.int32), anc_changes, decision_of(fam))


def decision_of(fam: PathFamily) -> policy.Decision:
  """The family's decision arrays as the program reads them: ΔC in float32, as the simulation
  decides (`policy.decide`)."""
  decision = policy.Decision.of(fam)
  return decision._replace(cand_cost=np.asarray(decision.cand_cost, np.float32))


def chunk(backbone: Backbone, spec: Spec, consts: Consts, lane: _Lane, out: _Gate,
          order: jax.Array, pos: jax.Array, end: jax.Array, *, gate: int, level: int, size: int,
          blocks: bool = True) -> tuple[_Lane, _Gate]:
  """`size` rows of a level group at a gate: rows order[pos:pos + size], those at or past `end`
  (another group's, or beyond the lane) replaced by the spare row.

  blocks=False leaves the segment's blocks out (the latency model times both).
  """
  spare = spec.batch
  at = pos + jnp.arange(size)
  rows = jnp.where(at < end, jax.lax.dynamic_slice(order, (pos,), (size,)), spare)
  params = consts.params
  bounds = (0,) + spec.exits
  # Gate 0 embeds its chunk's rows: gathering raw inputs moves less than embedding the lane
  # first and gathering hidden states (on MiniLM 64 token ids against 64 x 384 floats).
  h = backbone.embed(params, lane.images[rows]) if gate == 0 else lane.hidden[rows]
  if blocks:
    for i in range(bounds[gate], bounds[gate + 1]):
      h = backbone.block(params, i, h, spec.ladder[level])
  logits = backbone.exit_head(params, gate, h)
  stats = softmax_features(logits, None if gate == 0 else lane.last_logits[rows])
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  trio = jnp.stack([stats["max_prob"], stats["margin"], stats["entropy"]], axis=-1)
  out = out._replace(pred=out.pred.at[rows].set(pred), stats=out.stats.at[rows].set(trio))
  if gate == len(spec.exits) - 1:  # the last gate always exits: nothing to keep, no predictor
    return lane, out
  lane = lane._replace(hidden=lane.hidden.at[rows].set(h.astype(lane.hidden.dtype)),
                       last_logits=lane.last_logits.at[rows].set(logits.astype(jnp.float32)))
  if spec.kind == QUEE:
    summary = None
    if consts.proj is not None:
      summary = backbone.summary(params, gate, h).astype(jnp.float32) @ consts.proj
    anc = lane.anc_pred[rows]
    x = features.assemble(stats, lane.parent_stats[rows], anc, lane.anc_max_prob[rows], anc >= 0,
                          pred, summary, consts.onehots[lane.state[rows]])
    errors = jax.nn.sigmoid(predictor.logits(consts.mlp, x, gate, spec.predictor_level))
    out = out._replace(errors=out.errors.at[rows].set(errors))
  return lane, out


def _run_gate(backbone: Backbone, spec: Spec, consts: Consts, lane: _Lane, out: _Gate, gate: int
              ) -> tuple[_Lane, _Gate, jax.Array, jax.Array]:
  """Every level group of the lane through gate `gate`: (lane, out, rows computed, needed)."""
  B, m = spec.batch, spec.min_chunk
  num_levels = len(spec.ladder)
  key = jnp.where(lane.done[:B], num_levels, consts.level[lane.state[:B]])
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  order = jnp.concatenate([order, jnp.full(m, B, jnp.int32)])  # chunks may run past the end
  counts = jnp.bincount(key, length=num_levels + 1).astype(jnp.int32)
  first = jnp.cumsum(counts) - counts
  computed = needed = jnp.zeros((), jnp.int32)
  big, *smaller = chunk_sizes(B, m, spec.max_chunk)
  for q in spec.levels_at[gate]:
    units = (counts[q] + m - 1) // m
    pos, end = first[q], first[q] + counts[q]
    stop = pos + units * m  # the group's rows, rounded up to whole smallest chunks

    # (Every closure below is traced within this iteration: q and end are this group's.)
    def run(lane_out, pos, size):
      return chunk(backbone, spec, consts, *lane_out, order, pos, end, gate=gate, level=q,
                   size=size)
    # As many chunks of the largest size as fit, in a loop (one body, its buffers reused),
    # then the rest by its binary decomposition in smaller ones.
    lane, out, pos = jax.lax.while_loop(lambda c: c[2] + big <= stop,
                                        lambda c: (*run(c[:2], c[2], big), c[2] + big),
                                        (lane, out, pos))
    rest = units % (big // m)
    for size in smaller:
      take = (rest & (size // m)) != 0
      lane, out = _when(take, lambda c: run(c, pos, size), (lane, out))
      pos = pos + jnp.where(take, size, 0)
    computed, needed = computed + pos - first[q], needed + counts[q]
  return lane, out, computed, needed


def _decide(spec: Spec, consts: Consts, inputs: Inputs, lane: _Lane, out: _Gate, gate: int
            ) -> _Lane:
  """Exits or moves on every running sample of the lane after gate `gate`."""
  B = spec.batch
  cur, pred, stats = lane.state[:B], out.pred[:B], out.stats[:B]
  dec = consts.decision
  if gate == len(spec.exits) - 1:
    exiting, nxt = jnp.ones(B, bool), cur
  elif spec.kind == QUEE:
    errors = out.errors[:B]
    if consts.shrink is not None:
      errors = predictor.apply_shrinkage(errors, consts.shrink, dec, states=cur, xp=jnp)
    exiting, nxt = policy.step(dec, cur, errors, inputs.lam, spec.tau, xp=jnp)
  else:  # confidence exits: stay at the level, leave once confident enough
    exiting = stats[:, 0] >= inputs.thresholds[:, gate]
    nxt = jnp.where(exiting, cur, dec.child[cur, consts.level[cur]])
  running = ~lane.done[:B]
  leave, go = running & exiting, running & ~exiting
  switch = go & consts.anc_changes[nxt]
  return lane._replace(
      exit_state=_pad(jnp.where(leave, cur, lane.exit_state[:B]), -1),
      exit_pred=_pad(jnp.where(leave, pred, lane.exit_pred[:B]), -1),
      parent_stats=_pad(jnp.where(go[:, None], stats, lane.parent_stats[:B]), 0),
      anc_pred=_pad(jnp.where(switch, pred, lane.anc_pred[:B]), -1),
      anc_max_prob=_pad(jnp.where(switch, stats[:, 0], lane.anc_max_prob[:B]), 0),
      state=_pad(jnp.where(go, nxt, cur), 0),
      done=_pad(lane.done[:B] | leave, True))


def start_lane(backbone: Backbone, spec: Spec, consts: Consts, inputs: Inputs) -> _Lane:
  """A lane before gate 0: every sample at its root state, nothing embedded yet."""
  B = spec.batch
  h = jax.eval_shape(backbone.embed, consts.params, inputs.images[:1])
  # The spare row repeats a real input: all-padding token ids could mean an empty attention.
  images = jnp.concatenate([inputs.images, inputs.images[:1]])
  return _Lane(images=images, hidden=jnp.zeros((B + 1, *h.shape[1:]), h.dtype),
               last_logits=jnp.zeros((B + 1, backbone.num_classes), jnp.float32),
               state=_pad(inputs.start.astype(jnp.int32), 0),
               parent_stats=jnp.zeros((B + 1, 3), jnp.float32),
               anc_pred=jnp.full(B + 1, -1, jnp.int32), anc_max_prob=jnp.zeros(B + 1, jnp.float32),
               done=_pad(~inputs.live, True), exit_state=jnp.full(B + 1, -1, jnp.int32),
               exit_pred=jnp.full(B + 1, -1, jnp.int32))


def blank_gate(spec: Spec, consts: Consts) -> _Gate:
  """A gate's outputs before its chunks run."""
  B, num_cands = spec.batch, consts.decision.cand_cost.shape[-1]
  errors = jnp.zeros((B + 1, num_cands), jnp.float32) if spec.kind == QUEE else None
  return _Gate(jnp.zeros(B + 1, jnp.int32), jnp.zeros((B + 1, 3), jnp.float32), errors)


def _through_gate(backbone: Backbone, spec: Spec, consts: Consts, inputs: Inputs, gate: int,
                  carry: tuple[_Lane, jax.Array, jax.Array]
                  ) -> tuple[_Lane, jax.Array, jax.Array]:
  """The lane's running samples through gate `gate` and its decision; carry: (lane, rows
  computed, rows needed so far)."""
  lane, computed, needed = carry
  lane, out, c, n = _run_gate(backbone, spec, consts, lane, blank_gate(spec, consts), gate)
  return _decide(spec, consts, inputs, lane, out, gate), computed + c, needed + n


def run_lane(backbone: Backbone, spec: Spec, consts: Consts, inputs: Inputs) -> Output:
  """One lane of B samples through every gate (traced once per Spec and input shape)."""
  zero = jnp.zeros((), jnp.int32)
  carry = (start_lane(backbone, spec, consts, inputs), zero, zero)
  for g in range(len(spec.exits)):
    # A gate no sample of the lane reaches costs one reduction, not a sort, a skipped chunk per
    # level and size and a decision: where nearly every sample leaves at the first exit those
    # made the program slower than the host runner it replaced (docs/results/runtime.md).
    carry = _when(~jnp.all(carry[0].done),
                  functools.partial(_through_gate, backbone, spec, consts, inputs, g), carry)
  lane, computed, needed = carry
  B = spec.batch
  return Output(lane.exit_state[:B], lane.exit_pred[:B], computed[None], needed[None])
