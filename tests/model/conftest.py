"""Fixtures for tests that need the real model: one numpy copy and one Hugging Face reference per run.

The numpy model loads from the on-disk weight cache (the first run of a fresh machine fills it).
The transformers reference loads the same GGUF file on torch CPU (~10-50 s), once per session.
Near-ties seen in greedy comparisons are counted in `TIES` and reported at the end of the run.

numpy's BLAS and torch run on one thread here: on a shared 2-core machine two spinning BLAS threads
per process made a decode step up to ten times slower than one thread did.
"""
from __future__ import annotations

import pytest

from model.gguf_loader import default_model_path
from tests.model.exactness import MAX_REL_ERR, TIES


def pytest_terminal_summary(terminalreporter):
    if not TIES.compared and not MAX_REL_ERR:
        return
    terminalreporter.section("model exactness")
    for k, v in sorted(MAX_REL_ERR.items()):
        terminalreporter.write_line(f"max relative error, {k}: {v:.3e}")
    for line in TIES.lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Per module, so tests of other packages in the same run keep their own thread settings."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="session")
def lm():
    """The numpy model and tokenizer (weights memory-mapped from the default cache)."""
    from model.loaded import load_model

    return load_model()


@pytest.fixture(scope="session")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """Hugging Face transformers' reading of the same GGUF file, float32 on torch CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # see the module docstring
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    return model


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
