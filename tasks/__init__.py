"""Prefect tasks: one per IPR stage. Each reads input URIs, calls ipr_core,
writes Parquet/safetensors with a manifest, and returns the output URI."""
