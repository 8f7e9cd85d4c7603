"""Your own Flax model as a multi-exit `Backbone`, its module code untouched.

Name the parts of the model the adapter needs and where their parameters live:

  model = flax_adapter.FlaxModel(
      embed=flax_adapter.linen_part(PatchEmbed(...), ""),   # "" = the whole tree
      blocks=[flax_adapter.linen_part(block, f"Transformer/encoderblock_{i}",
                                      output=lambda out: out[0]) for i in range(12)],
      exits=(4, 8, 12), num_classes=1000, dim=768, pool="cls")
  params = model.init(key, variables["params"])   # {"model": your tree, "heads": fresh}
  backbone = model.backbone()                        # backend="aqt" (or "qwix")

A part is a function (params subtree, h) -> h and the '/'-separated path of its
subtree (`linen_part` and `nnx_part` make one from a module). Every block runs
at each precision level of the ladder through `quee_jax.core.rewrite.at_level`:
its matmuls, attention products included, are rewritten to the quantization
backend's at trace time (why that mechanism: `quee_jax.core.rewrite`). The
embedding runs float, as in the project's own models. Exit heads are the
project's (LayerNorm + Dense on pooled tokens, `models.layers`), trained post
hoc by `quee_jax.train.train_exit_heads`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from quee_jax.core import precision, rewrite
from quee_jax.core.backbone import Backbone, validate_exits
from quee_jax.models import layers

Params = Any
POOLS = ("cls", "gap")


class Part(NamedTuple):
  """A piece of the user's model: `apply(params_subtree, h) -> h` and where its subtree is.

  params: '/'-separated path into the model's parameter tree ("" = the whole tree).
  name: what errors call it (e.g. the module's class).
  """

  apply: Callable[[Params, jax.Array], jax.Array]
  params: str
  name: str = "part"


def linen_part(module: nn.Module, params: str, *, output: Callable[[Any], jax.Array] | None = None,
               **kwargs) -> Part:
  """A linen module applied to the parameters at path `params`.

  kwargs go to its `__call__` (e.g. deterministic=True); `output` picks the hidden
  state out of what it returns (big_vision's Encoder1DBlock returns (x, aux):
  `output=lambda out: out[0]`).
  """
  if not isinstance(module, nn.Module):
    raise ValueError(f"module: expected a flax.linen Module (linen_part), got"
                     f" {type(module).__name__}")
  pick = output or (lambda out: out)

  def apply(p, h):
    return pick(module.apply({"params": p}, h, **kwargs))

  return Part(apply, params, type(module).__name__)


def nnx_part(module: nnx.Module, params: str, *, output: Callable[[Any], jax.Array] | None = None,
             **kwargs) -> Part:
  """An NNX module, called with its parameters replaced by the subtree at path `params`
  (an `nnx.State` as `nnx.state(module, nnx.Param)` gives, or its pure dict)."""
  if not isinstance(module, nnx.Module):
    raise ValueError(f"module: expected a flax.nnx Module (nnx_part), got"
                     f" {type(module).__name__}")
  graphdef, _, rest = nnx.split(module, nnx.Param, ...)
  pick = output or (lambda out: out)

  def apply(p, h):
    return pick(nnx.merge(graphdef, p, rest)(h, **kwargs))

  return Part(apply, params, type(module).__name__)


def subtree(tree: Params, path: str, what: str) -> Params:
  """The subtree of `tree` at '/'-separated `path`; ValueError naming `what` if absent."""
  node, keys = tree, [k for k in path.split("/") if k]
  for i, key in enumerate(keys):
    if not isinstance(node, Mapping) or key not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      where = "/".join(keys[:i]) or "the root"
      raise ValueError(f"{what}: no parameters at {path!r} (no {key!r} under {where};"
                       f" found {have})")
    node = node[key]
  return node


def _apply(part: Part, p: Params, h, what: str):
  try:
    return part.apply(p, h)
  except flax.errors.FlaxError as e:  # e.g. a parameter of the module missing in its subtree
    first = str(e).splitlines()[0]
    raise ValueError(f"{what} ({part.name} with the parameters at {part.params!r}): {first}"
                     ) from None


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModel:
  """A user's Flax model cut into embedding and blocks, with the project's exit heads.

  Attributes:
    embed: the part mapping inputs to the hidden state before block 1 (runs float).
    blocks: one part per block, in order (the same module may serve every block,
      each with its own parameter path).
    exits: block counts after which an exit head sits; the last is len(blocks).
    num_classes: classes of every exit head.
    dim: width of the hidden state's last axis (the heads' input).
    pool: 'cls' (token 0), 'gap' (mean over tokens, axis -2), or a function
      h -> [..., dim].
    check_inputs: optional check of host inputs (the runtime calls it first).
    name: stored in table metadata.
  """

  embed: Part
  blocks: tuple[Part, ...]
  exits: tuple[int, ...]
  num_classes: int
  dim: int
  pool: str | Callable[[jax.Array], jax.Array] = "cls"
  check_inputs: Callable[[Any], None] | None = None
  name: str = "flax"

  def __post_init__(self):
    blocks = tuple(self.blocks)
    if not blocks:
      raise ValueError("FlaxModel.blocks: expected at least one block Part, got none")
    for name, part in (("embed", self.embed), *((f"blocks[{i}]", b) for i, b in enumerate(blocks))):
      if not isinstance(part, Part):
        raise ValueError(f"FlaxModel.{name}: expected a Part (linen_part, nnx_part), got"
                         f" {type(part).__name__}")
    object.__setattr__(self, "blocks", blocks)
    object.__setattr__(self, "exits", validate_exits(tuple(self.exits), len(blocks),
                                                     "FlaxModel.exits"))
    for field in ("num_classes", "dim"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < (2 if field ==
                                                                           "num_classes" else 1):
        raise ValueError(f"FlaxModel.{field}: expected a positive int"
                         f"{' >= 2' if field == 'num_classes' else ''}, got {value!r}")
    if not callable(self.pool) and self.pool not in POOLS:
      raise ValueError(f"FlaxModel.pool: expected one of {POOLS} or a function, got {self.pool!r}")

  def init(self, key: jax.Array, model_params: Params) -> Params:
    """{'model': model_params, 'heads': fresh exit heads} (every path checked)."""
    for i, part in enumerate((self.embed, *self.blocks)):
      subtree(model_params, part.params, "embed" if i == 0 else f"blocks[{i - 1}]")
    heads = layers.init_heads(key, len(self.exits), self.dim, self.num_classes,
                             layers.xavier_dense)
    return {"model": model_params, "heads": heads}

  def pooled(self, h: jax.Array) -> jax.Array:
    if callable(self.pool):
      return self.pool(h)
    return h[..., 0, :] if self.pool == "cls" else jnp.mean(h, axis=-2)

  @functools.cache
  def backbone(self, backend: str = precision.DEFAULT_BACKEND) -> Backbone:
    """The model behind the backbone interface, blocks quantized with `backend`.

    Cached per backend, so jitted functions keyed on the Backbone compile once.
    """
    precision.check_backend(backend)

    def embed(params, inputs):
      return _apply(self.embed, subtree(params["model"], self.embed.params, "embed"), inputs,
                    "embed")

    def block(params, i, h, level):
      what = f"blocks[{i}]"
      part = self.blocks[i]
      p = subtree(params["model"], part.params, what)
      return rewrite.at_level(lambda p, h: _apply(part, p, h, what), level, backend,
                              where=what)(p, h)

    config = {"model": self.name, "exits": list(self.exits), "num_classes": self.num_classes,
              "dim": self.dim, "pool": self.pool if isinstance(self.pool, str) else "custom",
              "embed": self.embed.params, "blocks": [b.params for b in self.blocks],
              "quant_backend": backend}
    return Backbone(
        num_blocks=len(self.blocks), exits=self.exits, num_classes=self.num_classes,
        embed=embed, block=block,
        exit_head=lambda params, e, h: layers.head_logits(params, e, self.pooled(h)),
        config=config,
        summary=lambda params, e, h: layers.head_summary(params, e, self.pooled(h)),
        check_inputs=self.check_inputs)
