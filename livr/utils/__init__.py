"""Utilities with no livr knowledge: atomic file writes and the console's noise filter and progress.

Layer: the bottom. Imports nothing of livr."""
