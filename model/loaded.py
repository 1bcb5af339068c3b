"""One call that gives a ready model and tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.gguf_loader import ModelWeights, load_weights
from model.tokenizer import Tokenizer
from model.transformer import Transformer


@dataclass(slots=True)
class LoadedModel:
    weights: ModelWeights
    model: Transformer
    tokenizer: Tokenizer


def load_model(path: Path | None = None) -> LoadedModel:
    weights = load_weights(path)
    return LoadedModel(weights, Transformer(weights), Tokenizer(weights.tokenizer_meta))
