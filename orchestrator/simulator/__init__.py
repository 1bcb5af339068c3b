"""Discrete-event simulator: the live router, prefill batcher, decode scheduler and KV allocator
driven by the hardware performance model (hardware/perf.py)."""
