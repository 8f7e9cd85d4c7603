import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images

import quee_jax as q
from quee_jax.core import cost


@pytest.mark.parametrize("cfg", [
    q.vit.ViTConfig(image_size=8, channels=1, patch=4, dim=16, depth=3, heads=2, mlp_dim=32,
                    num_classes=5),
    q.vit.ViTConfig(image_size=32, channels=3, patch=4, dim=64, depth=2, heads=4, mlp_dim=256,
                    num_classes=100, exits=(2,)),
])
def test_vit_macs_match_hand_formula(cfg):
  # Per sample, with T = (S/p)^2 + 1 tokens, D = dim, M = mlp_dim, C = classes:
  #   embedding  (T-1) * p*p*c * D                 (patch vectors x kernel)
  #   block      T*D*3D + T*D*D + 2*T*D*M          (qkv, out, mlp1, mlp2)  weight x act
  #              2 * T*T*D                          (QK^T and AV over all heads) act x act
  #   exit head  D * C
  params = q.vit.init(jax.random.key(0), cfg)
  t, d, m, c = cfg.num_tokens, cfg.dim, cfg.mlp_dim, cfg.num_classes
  embed, blocks, heads = cost.backbone_macs(q.vit.backbone(cfg), params, images(4, cfg))
  assert embed == q.MacCount((t - 1) * cfg.patch ** 2 * cfg.channels * d, 0)
  assert blocks == [q.MacCount(t * d * 3 * d + t * d * d + 2 * t * d * m, 2 * t * t * d)] * cfg.depth
  assert heads == [q.MacCount(d * c, 0)] * len(cfg.exits)


def test_quantized_block_has_the_same_macs(tiny):
  cfg, params, _ = tiny
  h = jnp.zeros((1, cfg.num_tokens, cfg.dim))
  counts = {name: q.count_macs(lambda h: q.vit.block(params, 0, h, q.parse_level(name), cfg), h)
            for name in ["float", "w8a8", "w2a4"]}
  assert len(set(counts.values())) == 1, counts


def test_conv_and_scan_are_counted():
  x = jnp.zeros((2, 10, 10, 3))
  k = jnp.zeros((3, 3, 3, 8))
  conv = lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert q.count_macs(conv, x).total == 2 * 8 * 8 * 8 * (3 * 3 * 3)
  w = jnp.zeros((4, 4))
  scanned = lambda v: jax.lax.scan(lambda c, _: (c @ w, None), v, None, length=5)[0]
  assert q.count_macs(scanned, jnp.zeros((1, 4))).total == 5 * 16


def test_bops_and_normalization(tiny):
  cfg, params, bb = tiny
  ladder = q.parse_ladder("float,w8a8,w4a4,w2a4")
  macs = cost.backbone_macs(bb, params, images(1))
  table = q.backbone_costs(bb, params, images(1), ladder)
  full = macs[0].total * 256 + sum(b.total for b in macs[1]) * 256 + macs[2][-1].total * 256
  assert table.full_model == full
  blk = macs[1][0]
  np.testing.assert_allclose(table.blocks[0] * full, [
      256 * blk.total, 64 * blk.total, 16 * blk.total, 8 * blk.weight + 16 * blk.act_x_act])
  np.testing.assert_allclose(table.embed + table.blocks[:, 0].sum() + table.heads[-1], 1.0)
  macs_table = q.backbone_costs(bb, params, images(1), ladder, unit="macs")
  np.testing.assert_allclose(macs_table.blocks[:, 0], macs_table.blocks[:, 3])
  # The top level is the most expensive one, wherever it sits in the ladder.
  reordered = q.backbone_costs(bb, params, images(1), ladder[::-1])
  np.testing.assert_allclose(reordered.blocks[:, ::-1], table.blocks)
  assert q.CostTable.from_dict(table.to_dict()) == table


def test_bad_cost_arguments_raise(tiny):
  _, params, bb = tiny
  with pytest.raises(ValueError, match="unit"):
    q.backbone_costs(bb, params, images(1), q.parse_ladder("float"), unit="flops")
  with pytest.raises(ValueError, match="float_bits"):
    q.backbone_costs(bb, params, images(1), q.parse_ladder("float"), float_bits=0)
