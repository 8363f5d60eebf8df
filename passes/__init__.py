"""Rewriting layer: pass manager, config, Inductor registration, reports, safety."""
