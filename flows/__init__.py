"""Prefect flows: the IPR parent pipeline and its per-iteration subflow."""
