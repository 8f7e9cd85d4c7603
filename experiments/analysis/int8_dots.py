r"""Are int8 x int8 -> int32 dots exact on this device? The check behind docs/results/gpu_numerics.md.

  python -m experiments.analysis.int8_dots --workdir /tmp/quee_int8
  python -m experiments.analysis.int8_dots --avoid_triton_gemm --workdir /tmp/quee_int8_cublas

Every quantized matmul of the models lowers to one `s8 x s8 -> s32` dot
(`quee_jax.core.precision`). For each shape this runs `lax.dot_general` on
random int8 operands in [-127, 127] with `preferred_element_type=int32`, jitted
on the default device, and prints the fraction of outputs equal to the exact
product (numpy, int64). Integer dots have no rounding: anything below 1.0 is a
wrong kernel. Then the same shapes through `precision.dense` at w8a8 (AQT's
quantize -> int dot -> rescale on float inputs), on the default device against
the host CPU: the fraction of outputs within 1e-4 relative (a wrong int dot is
off by far more).

Shapes are MxKxN ([M, K] x [K, N]) or BxMxKxN (B batched products). The
defaults: the error predictors' layers ([256, 33] x [33, 16]: 33 features, 16
hidden units; [256, 16] x [16, 25]), the same with K = 36, 40, 48, and the
Fashion-MNIST ViT's block matmuls for 256 images (16 tokens, width 64, 4 heads
of 16, MLP 256): qkv, attention out, MLP in and out, and QK^T / AV per head.

XLA's autotuning and emitters are set through XLA_FLAGS as usual, e.g.
`XLA_FLAGS=--xla_gpu_autotune_level=0`; `--avoid_triton_gemm` first calls
`quee_jax.avoid_triton_gemm()` (cuBLAS instead of XLA's Triton GEMM on NVIDIA
GPUs). The last line printed is a JSON object; `--workdir` also writes it to
DIR/int8_dots.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

DEFAULT_SHAPES = (
    # error predictors (features -> 16 hidden -> candidate slots), and K around 33
    "256x33x16", "256x36x16", "256x40x16", "256x48x16", "256x16x25",
    # the Fashion-MNIST ViT, 256 images x 16 tokens: qkv, out, mlp1, mlp2
    "4096x64x192", "4096x64x64", "4096x64x256", "4096x256x64",
    # attention per (image, head): QK^T over the head dim, AV over the keys
    "1024x16x16x16",
)


def parse_shape(spec: str) -> tuple[int, int, int, int]:
  """'MxKxN' or 'BxMxKxN' -> (B, M, K, N); B = 0 for an unbatched product."""
  try:
    dims = tuple(int(d) for d in spec.lower().split("x"))
  except ValueError:
    dims = ()
  if len(dims) not in (3, 4) or min(dims) < 1:
    raise ValueError(f"shape: expected MxKxN or BxMxKxN with positive sizes, got {spec!r}")
  return dims if len(dims) == 4 else (0, *dims)


def describe(shape: tuple[int, int, int, int]) -> str:
  b, m, k, n = shape
  prefix = f"{b}×" if b else ""
  return f"{prefix}[{m},{k}]×[{k},{n}]"


def _operands(shape, rng, dtype=np.int8):
  b, m, k, n = shape
  lead = (b,) if b else ()
  if dtype == np.int8:
    return (rng.integers(-127, 128, size=(*lead, m, k), dtype=np.int8),
            rng.integers(-127, 128, size=(*lead, k, n), dtype=np.int8))
  return (rng.normal(size=(*lead, m, k)).astype(np.float32),
          rng.normal(size=(*lead, k, n)).astype(np.float32))


def _dims(shape):
  """dot_general dimension numbers of [(B,) M, K] x [(B,) K, N]."""
  if shape[0]:
    return (((2,), (1,)), ((0,), (0,)))
  return (((1,), (0,)), ((), ()))


def int_dot_exact(shape, seed: int = 0) -> float:
  """Fraction of outputs of the jitted s8 x s8 -> s32 dot_general equal to the exact product."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  lhs, rhs = _operands(shape, np.random.default_rng(seed))
  dims = _dims(shape)
  fn = jax.jit(lambda a, b: lax.dot_general(a, b, dims, preferred_element_type=jnp.int32))
  got = np.asarray(fn(jnp.asarray(lhs), jnp.asarray(rhs)))
  exact = np.matmul(lhs.astype(np.int64), rhs.astype(np.int64))
  return float(np.mean(got.astype(np.int64) == exact))


def dense_w8a8_close(shape, seed: int = 0) -> tuple[float, float]:
  """`precision.dense` at w8a8, default device vs host CPU: (fraction within 1e-4 rel., max |diff|)."""
  import jax
  import jax.numpy as jnp

  from quee_jax.core import precision

  x, kernel = _operands(shape, np.random.default_rng(seed), dtype=np.float32)
  if shape[0]:  # a batched product: the kernels differ per batch entry, so map over it
    fn = jax.vmap(lambda a, w: precision.dense(a, w, None, "w8a8"))
  else:
    fn = lambda a, w: precision.dense(a, w, None, "w8a8")  # noqa: E731
  jitted = jax.jit(fn)
  out = {}
  for name, device in (("default", jax.devices()[0]), ("cpu", jax.devices("cpu")[0])):
    args = jax.device_put((jnp.asarray(x), jnp.asarray(kernel)), device)
    out[name] = np.asarray(jitted(*args))
  diff = np.abs(out["default"] - out["cpu"])
  close = np.isclose(out["default"], out["cpu"], rtol=1e-4, atol=1e-4 * np.abs(out["cpu"]).max())
  return float(np.mean(close)), float(diff.max())


def run(shapes, seed: int = 0, dense: bool = True) -> dict:
  """Every check on the default device; the dict the script prints as JSON."""
  import jax

  device = jax.devices()[0]
  result = {"platform": device.platform, "device": device.device_kind,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
            "int_dot_exact": {}, "dense_w8a8_close": {}}
  for spec in shapes:
    shape = parse_shape(spec)
    result["int_dot_exact"][describe(shape)] = int_dot_exact(shape, seed)
    if dense:
      close, max_diff = dense_w8a8_close(shape, seed)
      result["dense_w8a8_close"][describe(shape)] = {"close": close, "max_diff": max_diff}
  return result


def report(result: dict) -> str:
  lines = [f"device: {result['platform']} ({result['device']}), jax {result['jax']},"
           f" XLA_FLAGS={result['xla_flags']!r}",
           "| shape | s8×s8→s32 dot: exact | dense w8a8 vs CPU: close (max |diff|) |",
           "|---|---|---|"]
  for shape, exact in result["int_dot_exact"].items():
    dense = result["dense_w8a8_close"].get(shape)
    col = f"{dense['close']:.4f} ({dense['max_diff']:.3g})" if dense else "—"
    lines.append(f"| {shape} | {exact:.4f} | {col} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                      help="comma-separated MxKxN or BxMxKxN (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_dense", action="store_true", help="skip the precision.dense check")
  parser.add_argument("--avoid_triton_gemm", action="store_true",
                      help="call quee_jax.avoid_triton_gemm() before jax starts")
  parser.add_argument("--workdir", default=None, help="also write DIR/int8_dots.json")
  args = parser.parse_args(argv)
  shapes = [s for s in args.shapes.split(",") if s.strip()]
  for spec in shapes:  # bad input stops before jax starts
    parse_shape(spec)
  if args.avoid_triton_gemm:
    from quee_jax.core import precision
    precision.avoid_triton_gemm()
  result = run(shapes, args.seed, dense=not args.no_dense)
  print(report(result))
  line = json.dumps(result, ensure_ascii=False)
  if args.workdir:
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "int8_dots.json"), "w") as f:
      f.write(line + "\n")
  print(line)
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"error: {e}")
