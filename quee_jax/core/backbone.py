"""The small interface through which the QuEE core sees any backbone.

Paths, collection, targets, predictors, policy and runtime never import a model
module: they take a `Backbone`, so a ViT, a BERT encoder, a ResNet or a Flax
linen model wrapped in three functions becomes adaptive without edits here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax

from quee_jax.core.precision import Level

Params = Any


class Backbone(NamedTuple):
  """A multi-exit network as pure functions.

  Attributes:
    num_blocks: number of blocks L.
    exits: block counts after which an exit head sits, increasing, the last one
      equal to L (exit e reads the hidden state after `exits[e]` blocks).
    num_classes: number of output classes of every exit head.
    embed: `embed(params, inputs) -> h`: inputs to the hidden state before block 1.
    block: `block(params, i, h, level) -> h`: block i (0-based) at `level`.
      Must treat every leading axis of h as a batch axis and keep samples
      independent (per-token activation scales), so states can be batched.
    exit_head: `exit_head(params, e, h) -> logits`: exit e (index into exits).
    config: JSON-serializable description, stored in table metadata.
    summary: optional `summary(params, e, h) -> [..., D]`: a vector per sample
      describing the hidden state at exit e (the ViT's normalized class token);
      tables keep a low-dimensional projection of it as predictor input.
    check_inputs: optional `check_inputs(inputs)` on host arrays, raising
      ValueError on what the model cannot read (e.g. token ids beyond the
      vocabulary, which a gather would silently clamp); the runtime calls it
      before any compute.
  """

  num_blocks: int
  exits: tuple[int, ...]
  num_classes: int
  embed: Callable[[Params, jax.Array], jax.Array]
  block: Callable[[Params, int, jax.Array, Level], jax.Array]
  exit_head: Callable[[Params, int, jax.Array], jax.Array]
  config: dict
  summary: Callable[[Params, int, jax.Array], jax.Array] | None = None
  check_inputs: Callable[[Any], None] | None = None


def validate_exits(exits: tuple[int, ...], num_blocks: int, arg: str = "exits"
                   ) -> tuple[int, ...]:
  """Checks exit positions: increasing ints in [1, num_blocks], last = num_blocks."""
  exits = tuple(exits)
  if not exits or any(isinstance(e, bool) or not isinstance(e, int) for e in exits):
    raise ValueError(f"{arg}: expected a non-empty tuple of ints, got {exits!r}")
  if any(b <= a for a, b in zip(exits, exits[1:])):
    raise ValueError(f"{arg}: must be strictly increasing, got {exits}")
  if exits[0] < 1 or exits[-1] != num_blocks:
    raise ValueError(
        f"{arg}: positions must lie in [1, {num_blocks}] and end with the last"
        f" block {num_blocks}, got {exits}")
  return exits


def exit_states(backbone: Backbone, params: Params, inputs: jax.Array,
                levels: Sequence[Level]) -> list[jax.Array]:
  """The hidden state at every exit, from one forward with block i at levels[i]."""
  if len(levels) != backbone.num_blocks:
    raise ValueError(f"levels: expected one level per block ({backbone.num_blocks}),"
                     f" got {len(levels)}")
  h = backbone.embed(params, inputs)
  states = []
  for i, level in enumerate(levels):
    h = backbone.block(params, i, h, level)
    if i + 1 in backbone.exits:
      states.append(h)
  return states


def exit_logits(backbone: Backbone, params: Params, inputs: jax.Array,
                levels: Sequence[Level]) -> jax.Array:
  """Every exit's logits [num_exits, batch, classes] with block i at levels[i]."""
  states = exit_states(backbone, params, inputs, levels)
  return jax.numpy.stack([backbone.exit_head(params, e, h) for e, h in enumerate(states)])


class ByIdentity:
  """A value hashed by identity, for jit's static arguments and caches keyed on objects
  that do not hash (a Backbone holds a dict and closures; a PathFamily, arrays)."""

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, ByIdentity) and other.value is self.value
