"""Faces: the Python API, the CLI and the benchmark runner."""
