"""The live system: the engine that drives requests through the Ray pools, the pools' adapters, the deployment,
the gRPC frontend with its validation, auth and Prometheus metrics."""
