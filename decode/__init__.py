"""Decode side: paged KV pool and block allocator, continuous-batching scheduler (pure), the
vectorised decode core and the DecodeWorker. The pure parts (allocator, scheduler, step-time model)
import nothing heavy, so the simulator can use them directly."""
