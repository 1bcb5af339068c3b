"""Shared fixtures for decode tests: one loaded model per module, cached greedy references."""
from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits

from model.loaded import load_model
from tests.decode.driver import ReferenceBook

# a fixed English passage: prompts are prefixes of it starting at different offsets
PASSAGE = (
    "The history of computing is a story of layers. Early machines were programmed by rewiring "
    "panels; then came stored programs, assemblers, compilers and operating systems. Each layer "
    "hid the one below it and let more people build on top. Today a student can train a small "
    "language model on a laptop, write a web service in an afternoon, and deploy it to a cluster "
    "of machines spread across several continents. Yet the old questions remain: how fast is it, "
    "how much memory does it need, and what happens when two requests arrive at the same time?"
)
PROMPT_LENGTHS = (3, 5, 8, 12, 17, 20, 24, 31, 33, 40, 47, 50, 57, 64, 70, 77)


@pytest.fixture(scope="module")
def lm():
    # one BLAS thread: OpenBLAS threads spin badly when other jobs share the 2 cores
    with threadpool_limits(limits=1):
        yield load_model()


@pytest.fixture(scope="module")
def book(lm):
    ids = lm.tokenizer.encode(PASSAGE)
    prompts = [ids[(7 * i) % 20:(7 * i) % 20 + n] for i, n in enumerate(PROMPT_LENGTHS)]
    return ReferenceBook(lm, prompts)
