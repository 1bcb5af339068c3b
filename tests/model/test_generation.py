"""Generation with the numpy model, sampling, and refusals of bad input at the model's API edge."""
from __future__ import annotations

import numpy as np
import pytest

from model.generation import TextStream, find_stop, generate
from model.sampling import SamplingParams, make_rng, sample_batch, sample_one
from model.tokenizer import ChatMessage

CHAT_PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def chat_ids(lm):
    return lm.tokenizer.chat_ids([ChatMessage("user", CHAT_PROMPT)])


def _run(lm, ids, **kw):
    out = list(generate(lm.model, lm.tokenizer, ids, SamplingParams(**kw)))
    return [t.token_id for t in out], "".join(t.text for t in out)


def test_capital_of_france_is_paris(lm, chat_ids):
    tokens, text = _run(lm, chat_ids, max_tokens=40)
    print(f"answer: {text!r}")
    assert "Paris" in text, text
    assert len(tokens) < 40, "a one-sentence answer should end with a stop token"
    assert text == lm.tokenizer.decode(tokens)
    assert not set(tokens) & lm.tokenizer.stop_token_ids


def test_ignore_eos_runs_to_max_tokens(lm, chat_ids):
    normal, _ = _run(lm, chat_ids, max_tokens=40)
    forced, text = _run(lm, chat_ids, max_tokens=40, ignore_eos=True)
    assert forced[:len(normal)] == normal and len(forced) == 40
    assert set(forced) & lm.tokenizer.stop_token_ids, "the EOS the model chose is kept, not skipped"


def test_same_seed_same_tokens(lm, chat_ids):
    a = _run(lm, chat_ids, max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    b = _run(lm, chat_ids, max_tokens=8, temperature=1.0, top_p=0.95, seed=1234)
    assert a == b and a[0]


def test_tiny_top_p_behaves_like_greedy(lm, chat_ids):
    greedy = _run(lm, chat_ids, max_tokens=8)
    nucleus = _run(lm, chat_ids, max_tokens=8, temperature=1.5, top_p=1e-9, seed=7)
    assert nucleus == greedy


def test_max_tokens_bounds_the_output(lm):
    ids = lm.tokenizer.encode("Once upon a time", add_special_tokens=False)
    tokens, _ = _run(lm, ids, max_tokens=3)
    assert 1 <= len(tokens) <= 3


def test_stop_string_is_cut_from_the_stream(lm, chat_ids):
    _, full = _run(lm, chat_ids, max_tokens=40)
    assert "Paris" in full
    _, cut = _run(lm, chat_ids, max_tokens=40, stop=("Paris",))
    assert cut == full[:full.index("Paris")]


def test_generate_refuses_prompt_plus_max_tokens_beyond_context(lm):
    cfg = lm.model.cfg
    with pytest.raises(ValueError, match="max_tokens"):
        next(generate(lm.model, lm.tokenizer, [1] * 10, SamplingParams(max_tokens=cfg.context_length)))


# -- sampling on synthetic logits --------------------------------------------------------------

def test_sample_one_greedy_and_tiny_top_p_pick_argmax():
    rng = np.random.default_rng(0)
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        best = int(np.argmax(logits))
        assert sample_one(logits, SamplingParams(), rng) == best
        assert sample_one(logits, SamplingParams(temperature=2.0, top_p=1e-6), rng) == best


def test_sample_one_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float64)).astype(np.float32)
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=1.0, top_p=0.7)  # nucleus {0, 1} (0.5 + 0.3 >= 0.7)
    seen = {sample_one(logits, params, rng) for _ in range(400)}
    assert seen == {0, 1}


def test_seeded_rng_is_reproducible():
    logits = np.random.default_rng(1).standard_normal(500).astype(np.float32)
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    a = [sample_one(logits, p, r) for r in [make_rng(p)] for _ in range(20)]
    b = [sample_one(logits, p, r) for r in [make_rng(p)] for _ in range(20)]
    assert a == b


def test_sample_batch_mixes_greedy_and_sampled_rows():
    logits = np.random.default_rng(2).standard_normal((3, 100)).astype(np.float32)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_p=1e-9, seed=1), SamplingParams()]
    out = sample_batch(logits, params, [make_rng(p) for p in params])
    np.testing.assert_array_equal(out, np.argmax(logits, axis=1))


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(stop=("",)), "stop"),
])
def test_sampling_params_validate_names_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs).validate()
    assert str(e.value).startswith(f"{field}:"), str(e.value)


def test_sampling_params_limit_and_valid_values():
    with pytest.raises(ValueError, match="^max_tokens:"):
        SamplingParams(max_tokens=100).validate(max_tokens_limit=50)
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0).validate()
    SamplingParams(max_tokens=50, temperature=0.7, top_p=0.01, seed=3, stop=("\n",)).validate(50)


def test_find_stop():
    assert find_stop("abc. def", (".", "de")) == 3
    assert find_stop("abc", ("x",)) == -1
    assert find_stop("abc", ()) == -1


# -- prefill refuses bad token ids -------------------------------------------------------------

@pytest.mark.parametrize("ids", [[], np.array([], dtype=np.int64), [[1, 2], [3, 4]], [-1], [5, 49152], [10**9]],
                         ids=["empty_list", "empty_array", "two_d", "negative", "vocab_size", "huge"])
def test_prefill_refuses_bad_token_ids(lm, ids):
    with pytest.raises(ValueError, match="^token_ids:"):
        lm.model.prefill(ids)


def test_prefill_refuses_too_long_prompt(lm):
    with pytest.raises(ValueError, match="^token_ids:.*context"):
        lm.model.prefill([1] * (lm.model.cfg.context_length + 1))


def _stream(lm, ids, stop):
    text, out = TextStream(lm.tokenizer, stop), []
    for t in ids:
        out += text.push(t)
        if text.stopped:
            break
    out += [] if text.stopped else text.flush()
    return [t for t, _ in out], "".join(delta for _, delta in out), text.stopped


def test_text_stream_never_streams_part_of_a_stop_string(lm):
    ids = lm.tokenizer.encode("Hello world, hello moon", add_special_tokens=False)
    full = lm.tokenizer.decode(ids)
    assert _stream(lm, ids, ()) == (ids, full, False)
    got, text, stopped = _stream(lm, ids, ("o w",))  # spans "Hello" and " world"
    assert stopped and text == "Hell" and got == ids[:len(got)] and len(got) < len(ids)
    assert _stream(lm, ids, ("o wx",)) == (ids, full, False)  # "Hello" held back for its "o", released
    assert _stream(lm, ids, ("moonx",)) == (ids, full, False)  # the end held back, released by flush()


def test_a_subnormal_temperature_samples_the_argmax_and_a_negative_seed_is_refused():
    """Both used to reach the workers and fail a whole prefill batch (found by serving/test_fuzz.py)."""
    logits = np.array([0.5, 3.0, -1.0, 2.9], dtype=np.float32)
    rng = np.random.default_rng(0)
    for temperature in (5e-324, 2.2e-309, 1e-300):
        assert sample_one(logits, SamplingParams(temperature=temperature), rng) == 1
    with pytest.raises(ValueError, match="seed: must be >= 0"):
        SamplingParams(seed=-1).validate()


@pytest.mark.parametrize("sizes", [(1, 1, 1), (16, 16, 3), (5, 40), (64,)])
def test_chunked_prefill_equals_whole_prefill(lm, sizes):
    """Chunk after chunk (each attending to the K/V of those before it) gives the whole prompt's last
    logits and per-layer K/V, to float32 rounding."""
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, then naps in the sun " * 3)
    ids = ids[:sum(sizes)]
    whole_logits, whole_ks, whole_vs = lm.model.prefill(ids)
    ks, vs, at, seen = [], [], 0, []
    for n in sizes:
        logits, k, v = lm.model.prefill_chunk(ids[at:at + n], ks, vs, on_layer=lambda layer, k, v: seen.append(layer))
        ks = [np.concatenate([a, b]) for a, b in zip(ks, k)] if ks else k
        vs = [np.concatenate([a, b]) for a, b in zip(vs, v)] if vs else v
        at += n
    assert seen == list(range(lm.model.cfg.n_layers)) * len(sizes)
    np.testing.assert_allclose(logits, whole_logits, rtol=1e-4, atol=1e-3)
    assert int(logits.argmax()) == int(whole_logits.argmax())
    for a, b in zip(ks + vs, list(whole_ks) + list(whole_vs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_prefill_chunk_refuses_what_would_pass_the_context_window(lm):
    ctx = lm.model.cfg.context_length
    past = [np.zeros((ctx, lm.model.cfg.n_kv_heads, lm.model.cfg.head_dim), np.float32)] * lm.model.cfg.n_layers
    with pytest.raises(ValueError, match="context window"):
        lm.model.prefill_chunk([1], past, past)
