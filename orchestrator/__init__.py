"""Disaggregated prefill/decode orchestrator: config, router, pools, gRPC frontend, client, simulator."""
