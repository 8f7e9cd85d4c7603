"""Analyses that figures in docs/results/ rest on, one script each (tested in tests/)."""
