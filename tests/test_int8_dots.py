"""experiments/analysis/int8_dots.py, the check behind docs/results/gpu_numerics.md, runs; on
the CPU every int8 dot is exact."""

import json

import pytest

from experiments.analysis import int8_dots


def test_defaults_hold_the_shapes_of_the_finding():
  shapes = [int8_dots.parse_shape(s) for s in int8_dots.DEFAULT_SHAPES]
  assert (0, 256, 33, 16) in shapes  # the error predictors' first layer, wrong under Triton
  assert (0, 4096, 64, 192) in shapes and (1024, 16, 16, 16) in shapes  # the ViT's


def test_every_int8_dot_is_exact_on_the_cpu(tmp_path, capsys):
  out = int8_dots.main(["--shapes", "256x33x16,64x36x16,3x16x16x16", "--workdir", str(tmp_path)])
  assert out["platform"] == "cpu"
  assert out["int_dot_exact"] == {"[256,33]×[33,16]": 1.0, "[64,36]×[36,16]": 1.0,
                                  "3×[16,16]×[16,16]": 1.0}
  assert all(d["close"] == 1.0 for d in out["dense_w8a8_close"].values())
  printed = capsys.readouterr().out
  assert "| [256,33]×[33,16] | 1.0000 |" in printed
  assert json.loads(printed.strip().splitlines()[-1]) == out
  assert json.loads((tmp_path / "int8_dots.json").read_text()) == out


@pytest.mark.parametrize("spec", ["256x33", "0x3x4", "axbxc", "1x2x3x4x5"])
def test_bad_shapes_are_named(spec):
  with pytest.raises(ValueError, match="MxKxN"):
    int8_dots.parse_shape(spec)
