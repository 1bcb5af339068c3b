"""Tokenizer built from the GGUF metadata: exact agreement with transformers, round trips, streaming."""
from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings, strategies as st

from model.tokenizer import ChatMessage, IncrementalDecoder

LONG_TEXT = (
    "Disaggregated inference splits the prompt-processing phase from token generation. "
    "The prefill pool is compute-bound; the decode pool is bound by memory bandwidth. "
) * 12 + "Fin."

STRINGS = [
    "",
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "   three leading spaces",
    "multiple     spaces    between",
    "\ttab\tseparated\tvalues",
    "line one\nline two\n\nline four",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\n",
    " \t \n \r\n ",
    "1234567890",
    "3.14159 2.71828 -42 +7 1e-5 0x1F",
    "The year 2026 had 365 days; 1,000,000 requests at 99.9% SLA.",
    "Ünïcödé àccénts: café, naïve, façade, Straße",
    "Ελληνικά και Русский текст",
    "中文字符测试：今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな",
    "한국어 문장입니다.",
    "مرحبا بالعالم",
    "עברית",
    "हिन्दी भाषा",
    "emoji 😀🎉🚀 in text",
    "family emoji 👨‍👩‍👧‍👦 and flag 🇫🇷",
    "🦀",
    "math: ∑ x² ≤ ∞, α→β, √2 ≈ 1.414",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "<html><body><p class=\"x\">Hi</p></body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "ALL CAPS SENTENCE!!!",
    "don't won't it's we're I'm you'll they'd",
    "quotes “curly” ‘single’ «guillemets»",
    "...---...???!!!",
    "a",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "text before <|endoftext|> text after",
    "<|im_start|><|im_end|><|im_start|>",
    "zero\u200bwidth\u00a0nbsp",
    "mixed 中文 and English and 😀 and 123",
    LONG_TEXT,
]
assert len(STRINGS) == 50 and len(set(STRINGS)) == 50


@pytest.mark.reference
def test_encode_matches_transformers(lm, hf_tokenizer):
    mismatches = []
    for s in STRINGS:
        ours = lm.tokenizer.encode(s, add_special_tokens=False)
        ref = hf_tokenizer.encode(s, add_special_tokens=False)
        if ours != ref:
            mismatches.append((s[:60], ours[:20], ref[:20]))
    assert not mismatches, mismatches


@pytest.mark.reference
def test_decode_matches_transformers(lm, hf_tokenizer):
    for s in STRINGS:
        ids = lm.tokenizer.encode(s, add_special_tokens=False)
        assert lm.tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(
            ids, skip_special_tokens=False), s


@pytest.mark.reference
def test_chat_template_matches_transformers(lm, hf_tokenizer):
    messages = [ChatMessage("user", "What is the capital of France? Answer in one sentence.")]
    ours = lm.tokenizer.apply_chat_template(messages)
    ref = hf_tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                           tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert lm.tokenizer.chat_ids(messages) == hf_tokenizer.encode(ref, add_special_tokens=False)


def test_chat_markup_maps_to_single_control_tokens(lm):
    tok = lm.tokenizer
    for marker in ("<|im_start|>", "<|im_end|>"):
        ids = tok.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tok.special_ids, (marker, ids)
    assert tok.encode("<|im_end|>", add_special_tokens=False)[0] in tok.stop_token_ids


@pytest.mark.parametrize("s", STRINGS, ids=range(len(STRINGS)))
def test_decode_round_trips(lm, s):
    tok = lm.tokenizer
    ids = tok.encode(s, add_special_tokens=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == s


def test_decode_skips_control_tokens(lm):
    tok = lm.tokenizer
    ids = tok.encode("<|im_start|>assistant\nParis<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids) == "assistant\nParis"


def _stream(tok, ids):
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec


@pytest.mark.parametrize("s", STRINGS, ids=range(len(STRINGS)))
def test_incremental_decoder_concatenates_to_full_decode(lm, s):
    tok = lm.tokenizer
    ids = tok.encode(s, add_special_tokens=False)
    deltas, dec = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == dec.text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_decoder_holds_back_split_emoji(lm):
    tok = lm.tokenizer
    s = "ok 🦀 then 👨‍👩‍👧‍👦!"
    ids = tok.encode(s, add_special_tokens=False)
    # the test only means something if some emoji really spans several tokens
    partial = [i for i in ids if tok.decode([i]).endswith("\ufffd") or "\ufffd" in tok.decode([i])]
    assert partial, "expected at least one token holding part of a multi-byte character"
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == s
    assert any(d == "" for d in deltas), "a token that ends mid-character must yield no text yet"


@functools.lru_cache(maxsize=1)
def _tokenizer():
    """The tokenizer alone (hypothesis prints its arguments; a whole model would flood the report)."""
    from model.loaded import load_model

    return load_model().tokenizer


# Characters whose UTF-8 bytes all exist as byte tokens: the vocabulary lacks the bytes of a few
# C0 controls and the lead bytes 0xF1-0xF7 (code points above U+3FFFF), as transformers' does.
REPRESENTABLE = st.characters(max_codepoint=0x3FFFF, blacklist_categories=("Cs", "Cc"),
                              blacklist_characters="\ufffd")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=REPRESENTABLE, max_size=40))
def test_round_trip_and_streaming_property(s):
    tok = _tokenizer()
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == s
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)


def test_save_pretrained_writes_the_same_tokenizer(lm, tmp_path):
    """The Hugging Face directory a third-party tool counts tokens with (bench/loadgen.py) is this tokenizer."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    tok = lm.tokenizer
    d = tok.save_pretrained(tmp_path / "tok")
    saved = HFTokenizer.from_file(str(d / "tokenizer.json"))
    for s in STRINGS:
        assert saved.encode(s, add_special_tokens=False).ids == tok.encode(s, add_special_tokens=False), s
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert config["eos_token"] == tok.tokens[tok.eos_token_id] and config["bos_token"] == tok.tokens[tok.bos_token_id]
    assert config["chat_template"] == tok.chat_template


@pytest.mark.reference
def test_save_pretrained_loads_in_transformers(lm, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(lm.tokenizer.save_pretrained(tmp_path / "tok")))
    for s in STRINGS:
        assert hf.encode(s, add_special_tokens=False) == lm.tokenizer.encode(s, add_special_tokens=False), s
    assert hf.eos_token_id == lm.tokenizer.eos_token_id
