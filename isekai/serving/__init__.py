"""Glue between Triton's Python backend and isekai.ensemble, and the embedded server launcher."""
