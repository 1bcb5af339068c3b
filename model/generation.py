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


class TextStream:
    """One sequence's text as its tokens arrive: UTF-8-safe deltas, ended by the first stop string.

    The one place stop strings are found (generate() here, the decode worker's request streams).
    A token whose text may begin a stop string is held back until a later token decides; the token
    that completes one releases the held tokens with their text cut before it, and `stopped` turns
    True. So no part of a stop string is ever streamed, even one split across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._held: list[tuple[int, str]] = []  # (token id, text delta) not streamed yet
        self.stopped = False

    def prime(self, token_ids: list[int]) -> None:
        """Continue after tokens already streamed elsewhere (a migrated request): their bytes feed the
        decoder, their text is not emitted again. Streamed text never ends inside a stop string's
        prefix (push holds that back), so no stop string can start before the boundary."""
        for token_id in token_ids:
            self._decoder.push(token_id)

    def push(self, token_id: int) -> list[tuple[int, str]]:
        """Add a token; returns the (token id, text delta) pairs now safe to stream, in order."""
        assert not self.stopped, "push after a stop string"
        self._held.append((token_id, self._decoder.push(token_id)))
        if not self._stop:
            return self.flush()
        pending = "".join(text for _, text in self._held)  # the streamed text never ends in a stop string's prefix
        cut = find_stop(pending, self._stop)
        if cut >= 0:
            self.stopped = True
            return self._release(len(self._held), cut)
        safe = len(pending) - _stop_prefix_len(pending, self._stop)
        n, end = 0, 0
        while n < len(self._held) and end + len(self._held[n][1]) <= safe:
            end += len(self._held[n][1])
            n += 1
        return self._release(n, end)

    def flush(self) -> list[tuple[int, str]]:
        """Release everything held (the sequence ended without a stop string)."""
        return self._release(len(self._held), None)

    def _release(self, n: int, limit: int | None) -> list[tuple[int, str]]:
        """The first n held tokens, their texts cut at `limit` characters of held text (None: whole)."""
        out, at = [], 0
        for token_id, text in self._held[:n]:
            out.append((token_id, text if limit is None else text[:max(0, limit - at)]))
            at += len(text)
        del self._held[:n]
        return out


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that a stop string begins with (0 if none)."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int],
             params: SamplingParams) -> Iterator[GeneratedToken]:
    """Yield tokens one by one until a stop token, a stop string or max_tokens.

    Stop strings are cut out of the streamed text (TextStream: no part of one is ever yielded).
    """
    cfg = model.cfg
    if len(prompt_ids) + params.max_tokens > cfg.context_length:
        raise ValueError(f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) "
                         f"exceeds the context window {cfg.context_length}")
    rng = make_rng(params)
    logits, ks, vs = model.prefill(prompt_ids)
    cache = DenseKVCache(cfg, batch=1, max_tokens=len(prompt_ids) + params.max_tokens)
    cache.load_prefill(0, ks, vs)
    text = TextStream(tokenizer, params.stop)
    for step in range(params.max_tokens):
        token = sample_one(logits, params, rng)
        if token in params.stop_token_ids(tokenizer.stop_token_ids):
            break
        yield from (GeneratedToken(t, delta) for t, delta in text.push(token))
        if text.stopped:
            return
        if step + 1 < params.max_tokens:
            logits = model.decode_step(np.array([token]), cache.lengths.copy(), cache)[0]
    yield from (GeneratedToken(t, delta) for t, delta in text.flush())


# DESIGN.md "Exactness and tests": a greedy stream may leave the reference only where the reference's
# top-two logits are within 1e-4 of the logit scale (about 30 for this model)
NEAR_TIE_MARGIN = 1e-4 * 30


def follows_greedy(got, ref: list[int], margins: list[float]) -> bool:
    """`got` follows the greedy reference (greedy_reference's tokens and margins) as far as both go,
    or first leaves it at a near-tie. Lengths are the caller's to check."""
    diff = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    return diff is None or margins[diff] < NEAR_TIE_MARGIN


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
