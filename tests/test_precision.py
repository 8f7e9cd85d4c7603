import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, images

import quee_jax as q
from quee_jax.core import precision


@pytest.mark.parametrize("name,bits", [("float", (None, None)), ("w8a8", (8, 8)),
                                       ("W4A8", (4, 8)), ("w2a4", (2, 4)), (" w3a3 ", (3, 3))])
def test_parse_level(name, bits):
  level = q.parse_level(name)
  assert (level.w_bits, level.a_bits) == bits
  assert q.parse_level(level.name) == level


@pytest.mark.parametrize("bad", ["w4", "w0a8", "w9a4", "w4a1", "float16", "int8", "", "w4a4x", 4, None])
def test_bad_level_names_raise(bad):
  with pytest.raises(ValueError, match="level"):
    q.parse_level(bad)


@pytest.mark.parametrize("w,a", [(0, 8), (9, 8), (4, None), (4, 2.0), (True, 4)])
def test_bad_bits_raise(w, a):
  with pytest.raises(ValueError, match="bits"):
    q.Level.from_bits(w, a)


def test_parse_ladder():
  ladder = q.parse_ladder("float, W4A4,w2a4")
  # A level is its own canonical name: it compares with config strings and goes into JSON as one.
  assert ladder == ("float", "w4a4", "w2a4") and json.loads(json.dumps(ladder)) == list(ladder)
  assert q.parse_ladder(ladder) == ladder and q.Level.from_bits(4, 4) == ladder[1]
  assert q.parse_ladder(np.array(["float", "w4a4"])) == ("float", "w4a4")
  for bad in ["", "float,float", "float,w4", "float,,w8a8", "float,", 4, {"float", "w4a4"}]:
    with pytest.raises(ValueError, match="ladder|level"):
      q.parse_ladder(bad)


def test_float_level_bypasses_aqt():
  assert precision.dot_general(q.FLOAT) is jax.lax.dot_general
  params = q.vit.init(jax.random.key(0), TINY)
  h = jnp.zeros((2, TINY.num_tokens, TINY.dim))
  jaxpr = str(jax.make_jaxpr(lambda h: q.vit.block(params, 0, h, q.FLOAT, TINY))(h))
  assert "int8" not in jaxpr and "round" not in jaxpr
  quantized = str(jax.make_jaxpr(lambda h: q.vit.block(params, 0, h, q.parse_level("w4a4"), TINY))(h))
  assert "round" in quantized and "i8" in quantized


@pytest.mark.parametrize("level", ["w8a8", "w4a8", "w2a4"])
def test_quantized_dense_is_one_int8_dot(level):
  x, w = jnp.ones((4, 32)), jnp.ones((32, 8))
  hlo = jax.jit(lambda x, w: precision.dense(x, w, None, q.parse_level(level))).lower(x, w).as_text()
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  assert len(dots) == 1 and "xi8" in dots[0] and "xi32" in dots[0], dots


@pytest.mark.parametrize("backend", precision.BACKENDS)
def test_weights_per_channel_activations_per_token(backend):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 32)).astype(np.float32)
  w = rng.normal(size=(32, 4)).astype(np.float32)
  level = q.parse_level("w4a4")
  dense = jax.jit(lambda x, w: precision.dense(x, w, None, level, backend))
  y = dense(x, w)
  # A row's output does not depend on the other rows (per-token scale; the
  # float dequantization may round differently by an ulp across shapes) ...
  np.testing.assert_allclose(dense(x[2:3], w), y[2:3], rtol=1e-6)
  # ... and a column's on the other columns (per-channel scale).
  w2 = w.copy()
  w2[:, 0] *= 100.0
  np.testing.assert_allclose(dense(x, w2)[:, 1:], y[:, 1:], rtol=1e-6)


@pytest.mark.parametrize("level", ["w8a8", "w4a4", "w2a4"])
def test_qwix_and_aqt_share_scales_and_differ_only_at_the_edge(level):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 5, 32)).astype(np.float32)
  w = rng.normal(size=(32, 8)).astype(np.float32)
  level = q.parse_level(level)
  aqt, qwix = (np.asarray(jax.jit(lambda x, w: precision.dense(x, w, None, level, b))(x, w))
               for b in precision.BACKENDS)
  # Exact integer products with both sides' scales, each backend's rounding at the edge
  # (AQT clips to 2^(b-1) - 1 codes, qwix's negative edge reaches -2^(b-1)).
  def simulated(edge, shrink=1.0):
    def quant(v, bits, axis):
      bound = 2.0 ** (bits - 1) - 0.5
      scale = shrink * np.abs(v).max(axis=axis, keepdims=True) / bound
      return np.clip(np.round(v / scale), -edge(bits), 2.0 ** (bits - 1) - 1) * scale
    return quant(x, level.a_bits, -1) @ quant(w, level.w_bits, 0)
  np.testing.assert_allclose(aqt, simulated(lambda b: 2.0 ** (b - 1) - 1), rtol=1e-4, atol=1e-4)
  # qwix's range shrunk by 1e-5 (precision.QWIX_CALIBRATION): the edge is never a tie.
  np.testing.assert_allclose(qwix, simulated(lambda b: 2.0 ** (b - 1), 0.99999), rtol=1e-4,
                             atol=1e-4)


def test_qwix_runs_two_dimensional_int4_dots():
  # XLA's CPU compiler rejects a 2-D x 2-D dot of two int4 operands; the seam adds a
  # batch axis, so a [batch, features] input runs and equals the 3-D one.
  x = np.random.default_rng(2).normal(size=(4, 32)).astype(np.float32)
  w = np.random.default_rng(3).normal(size=(32, 8)).astype(np.float32)
  level = q.parse_level("w4a4")
  flat = jax.jit(lambda x: precision.dense(x, w, None, level, "qwix"))(x)
  np.testing.assert_array_equal(
      np.asarray(flat), np.asarray(jax.jit(lambda x: precision.dense(x, w, None, level,
                                                                     "qwix"))(x[None]))[0])
  # With batch axes the unit axis sits after them: a row-wise product keeps its shape.
  rowwise = (((1,), (1,)), ((0,), (0,)))
  a, b = (jax.jit(lambda u, v, be=be: precision.quantized_dot_general(4, 4, be)(u, v, rowwise))(
      x, x[::-1]) for be in precision.BACKENDS)
  assert a.shape == b.shape == (4,)


def test_unknown_backend_is_named():
  with pytest.raises(ValueError, match=r"backend: expected one of \('aqt', 'qwix'\), got 'aqtp'"):
    precision.dot_general(q.parse_level("w8a8"), backend="aqtp")
  with pytest.raises(ValueError, match="backend: expected one of"):
    q.models.backbone(TINY, "int8")


def _plain_forward(params, x, cfg):
  """An independent plain-jnp float forward: the reference the float level must match."""
  def ln(v, p):
    m = jnp.mean(v, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(v - m), axis=-1, keepdims=True)
    return (v - m) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]
  b, p = x.shape[0], cfg.patch
  g = cfg.image_size // p
  patches = x.reshape(b, g, p, g, p, cfg.channels).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, g * g, p * p * cfg.channels)
  h = patches @ params["embedding"]["kernel"] + params["embedding"]["bias"]
  h = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, cfg.dim)), h], 1)
  h = h + params["pos_embedding"][0]
  dh = cfg.dim // cfg.heads
  outs = []
  for i, blk in enumerate(params["blocks"]):
    y = ln(h, blk["ln1"]) @ blk["qkv"]["kernel"] + blk["qkv"]["bias"]
    qq, kk, vv = (t.reshape(b, -1, cfg.heads, dh) for t in jnp.split(y, 3, -1))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", qq * dh ** -0.5, kk), -1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, vv).reshape(b, -1, cfg.dim)
    h = h + (y @ blk["out"]["kernel"] + blk["out"]["bias"])
    y = jax.nn.gelu(ln(h, blk["ln2"]) @ blk["mlp1"]["kernel"] + blk["mlp1"]["bias"])
    h = h + (y @ blk["mlp2"]["kernel"] + blk["mlp2"]["bias"])
    head = params["heads"][i]
    outs.append(ln(h[:, 0], head["norm"]) @ head["dense"]["kernel"] + head["dense"]["bias"])
  return jnp.stack(outs)


def test_float_level_equals_plain_forward_bit_for_bit(tiny):
  cfg, params, _ = tiny
  x = jnp.asarray(images(9))
  got, _ = jax.jit(lambda p, x: q.vit.forward(p, x, cfg, "float"))(params, x)
  want = jax.jit(lambda p, x: _plain_forward(p, x, cfg))(params, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_quantization_error_shrinks_with_bits():
  cfg = q.vit.ViTConfig(image_size=16, channels=3, patch=4, dim=64, depth=2, heads=4,
                        mlp_dim=128, num_classes=10)
  params = q.vit.init(jax.random.key(1), cfg)
  x = jnp.asarray(images(64, cfg))
  ref, _ = q.vit.forward(params, x, cfg, "float")

  def rel_err(level):
    out, _ = q.vit.forward(params, x, cfg, level)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))

  errs = {name: rel_err(name) for name in ["w2a8", "w4a4", "w4a8", "w8a8"]}
  assert errs["w2a8"] > errs["w4a4"] > errs["w8a8"] > 0, errs
  assert errs["w4a4"] > errs["w4a8"] > errs["w8a8"], errs
  assert errs["w8a8"] < 0.05, errs


@pytest.mark.parametrize("before,after", [
    (None, "--xla_gpu_enable_triton_gemm=false"),
    ("--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 --xla_gpu_enable_triton_gemm=false"),
    ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm=true"),  # the user's
    ("--xla_gpu_enable_triton_gemm_int4=true",  # another flag that merely starts the same
     "--xla_gpu_enable_triton_gemm_int4=true --xla_gpu_enable_triton_gemm=false"),
])
def test_triton_gemm_is_turned_off_unless_the_user_chose(before, after):
  assert precision.xla_flags_avoiding_triton_gemm(before) == after


def test_import_is_free_of_side_effects_and_the_flag_is_an_explicit_call():
  # In a fresh process: importing quee_jax leaves XLA_FLAGS, matplotlib and tfds alone;
  # avoid_triton_gemm() then adds the flag before jax starts, keeping the user's other flags
  # (two host devices, which shows XLA parsed the whole string).
  code = ("import os, sys, quee_jax; print(os.environ['XLA_FLAGS']);"
          " print('matplotlib' in sys.modules, 'tensorflow_datasets' in sys.modules);"
          " quee_jax.avoid_triton_gemm(); import jax;"
          " print(os.environ['XLA_FLAGS']); print(len(jax.devices()))")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout.split("\n")
  assert out[:2] == ["--xla_force_host_platform_device_count=2", "False False"]
  assert out[2] == "--xla_force_host_platform_device_count=2 --xla_gpu_enable_triton_gemm=false"
  assert out[3] == "2"
