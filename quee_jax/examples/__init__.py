"""Worked examples to copy: a user's own Flax model wrapped by `quee_jax.models.flax_adapter`."""
