"""Backbones implementing the `quee_jax.backbone.Backbone` interface."""
