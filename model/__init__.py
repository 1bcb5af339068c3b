"""The real model: GGUF loading, tokenizer, numpy transformer, and specs of big models."""
