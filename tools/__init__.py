"""Tooling: graph-diff, benchmarks, the CLI."""
