"""Errors raised at the model's edges (files and user input)."""


class ModelFileError(RuntimeError):
    """The model file is missing, truncated or not a usable GGUF file."""
