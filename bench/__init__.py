"""Benchmarks and calibration (not library code: not installed with the package). Results go under `RESULTS`."""
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # bench/results/, wherever the command runs from
