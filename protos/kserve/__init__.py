"""KServe v2 / Triton gRPC protocol (package `inference`), its descriptors in a pool of their own (pool.py)."""
