"""In-process generation with the numpy model: the reference every distributed path must match."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from model.sampling import SamplingParams, make_rng, sample_one
from model.tokenizer import IncrementalDecoder, Tokenizer
from model.transformer import DenseKVCache, Transformer


@dataclass(slots=True)
class GeneratedToken:
    token_id: int
    text: str  # the text delta this token completes (may be empty mid-character)


def find_stop(text: str, stop: tuple[str, ...]) -> int:
    """Index where the first stop string begins in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int],
             params: SamplingParams) -> Iterator[GeneratedToken]:
    """Yield tokens one by one until a stop token, a stop string or max_tokens.

    Stop strings are cut out of the streamed text (the final delta ends before them).
    """
    cfg = model.cfg
    if len(prompt_ids) + params.max_tokens > cfg.context_length:
        raise ValueError(f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) "
                         f"exceeds the context window {cfg.context_length}")
    rng = make_rng(params)
    logits, ks, vs = model.prefill(prompt_ids)
    cache = DenseKVCache(cfg, batch=1, max_tokens=len(prompt_ids) + params.max_tokens)
    cache.load_prefill(0, ks, vs)
    decoder = IncrementalDecoder(tokenizer)
    text = ""
    for step in range(params.max_tokens):
        token = sample_one(logits, params, rng)
        if token in params.stop_token_ids(tokenizer.stop_token_ids):
            return
        delta = decoder.push(token)
        if params.stop:
            cut = find_stop(text + delta, params.stop)
            if cut >= 0:
                yield GeneratedToken(token, (text + delta)[len(text):cut])
                return
        text += delta
        yield GeneratedToken(token, delta)
        if step + 1 < params.max_tokens:
            logits = model.decode_step(np.array([token]), cache.lengths.copy(), cache)[0]


def greedy_reference(model: Transformer, prompt_ids: list[int], max_tokens: int,
                     stop_token_ids: frozenset[int] = frozenset()) -> tuple[list[int], list[float]]:
    """Greedy token ids and, per step, the top-two logit margin (to judge near-ties)."""
    logits, ks, vs = model.prefill(prompt_ids)
    cache = DenseKVCache(model.cfg, batch=1, max_tokens=len(prompt_ids) + max_tokens)
    cache.load_prefill(0, ks, vs)
    tokens, margins = [], []
    for step in range(max_tokens):
        top2 = np.partition(logits, -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(np.argmax(logits))
        tokens.append(token)
        if token in stop_token_ids or step + 1 == max_tokens:
            break
        logits = model.decode_step(np.array([token]), cache.lengths.copy(), cache)[0]
    return tokens, margins
