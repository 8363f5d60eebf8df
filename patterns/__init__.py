"""Matching layer: recognise constructs in FX graphs and describe them as typed matches."""
