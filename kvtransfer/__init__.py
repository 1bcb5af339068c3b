"""KV-cache handoff between a prefill worker and a decode worker."""
