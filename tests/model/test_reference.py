"""The numpy transformer against Hugging Face transformers reading the same GGUF on torch CPU.

Tolerances follow DESIGN.md "Exactness and tests": logits agree to relative error < 1e-4
(max abs difference / max abs reference logit); argmax agrees at every position except where the
reference's top-two margin is below 1e-4 of the logit scale (a near-tie), and a greedy comparison
stops at such a step. Near-ties and the largest errors are reported in the terminal summary.
"""
from __future__ import annotations

import numpy as np
import pytest

from model.generation import greedy_reference
from model.tokenizer import ChatMessage
from model.transformer import DenseKVCache
from tests.model.exactness import TIES, record_rel_err

pytestmark = pytest.mark.reference

REL_TOL = 1e-4
TIE_FRACTION = 1e-4  # a near-tie: the reference's top-two margin is below this share of its logit scale
DECODE_STEPS = 8

CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
LONG_PROMPT = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines "
    "were programmed by rewiring plugboards; stored-program computers let instructions live in memory "
    "beside data. Assemblers gave names to opcodes, compilers translated structured languages into "
    "machine code, and operating systems multiplexed scarce hardware among many users. Networks joined "
    "the machines together, and the web turned documents into applications. Today large language "
    "models are served by clusters of accelerators: one pool processes prompts, which is bound by "
    "arithmetic, and another generates tokens one at a time, which is bound by memory bandwidth. "
    "Splitting the two phases lets each run on hardware suited to it, at the price of moving the "
    "key-value cache between them. Engineers must then decide where each request goes, how to batch "
    "the prompts, how many sequences to decode together, and when to refuse work that cannot meet its "
    "deadline. Queueing theory, scheduling and careful measurement all play a part.\n\n"
    "def schedule(requests, budget):\n    batch = []\n    for r in sorted(requests, key=lambda r: r.deadline):\n"
    "        if sum(x.tokens for x in batch) + r.tokens > budget:\n            break\n        batch.append(r)\n"
    "    return batch\n\nNumbers: 3.14159, 2.71828, 1.41421, 42, 1024, 65536. Emoji: 🚀🌍. 中文: 你好，世界。"
)


def _prompts(tok) -> dict[str, list[int]]:
    return {
        "one_token": tok.encode("Hello", add_special_tokens=False),
        "short": tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False),
        "code": tok.encode("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
                           add_special_tokens=False),
        "chat": tok.chat_ids([ChatMessage("user", CHAT_PROMPT)]),
        "long": tok.encode(LONG_PROMPT, add_special_tokens=False),
    }


@pytest.fixture(scope="module")
def prompts(lm):
    p = _prompts(lm.tokenizer)
    assert len(p["one_token"]) == 1
    assert len(p["long"]) >= 300, len(p["long"])
    return p


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def top2_margin(logits: np.ndarray) -> float:
    a, b = np.partition(logits, -2)[-2:]
    return float(b - a)


def is_near_tie(ref_logits: np.ndarray) -> bool:
    return top2_margin(ref_logits) < TIE_FRACTION * float(np.abs(ref_logits).max())


def check_argmax_rows(kind: str, ours: np.ndarray, ref: np.ndarray) -> None:
    """ours, ref: (N, V). Same argmax in every row except at near-ties of the reference."""
    for row, (o, r) in enumerate(zip(ours, ref)):
        tie = is_near_tie(r)
        diverged = int(np.argmax(o)) != int(np.argmax(r))
        TIES.note(kind, tie, diverged)
        assert not diverged or tie, (f"{kind}: argmax differs at row {row} "
                                     f"(margin {top2_margin(r):.3g}, scale {np.abs(r).max():.3g})")


class HFRunner:
    """Incremental forward passes of the transformers model with its own KV cache."""

    def __init__(self, hf_model):
        self.model = hf_model
        self.past = None

    def forward(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([ids], dtype=torch.long), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0].float().numpy()  # (len(ids), V)

    def kv(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, Hkv, Dh) keys (rotary applied) and values of one layer."""
        c = self.past
        if hasattr(c, "layers"):
            k, v = c.layers[layer].keys, c.layers[layer].values
        else:  # older transformers
            k, v = c.key_cache[layer], c.value_cache[layer]
        return k[0].transpose(0, 1).numpy(), v[0].transpose(0, 1).numpy()


@pytest.fixture(scope="module")
def hf_prefill(hf_model, prompts):
    """Per prompt: the reference's all-position logits and its cache right after the prompt."""
    out = {}
    for name, ids in prompts.items():
        runner = HFRunner(hf_model)
        logits = runner.forward(ids)
        kv = [runner.kv(layer) for layer in range(hf_model.config.num_hidden_layers)]
        out[name] = (logits, kv)
    return out


@pytest.mark.parametrize("name", ["one_token", "short", "code", "chat", "long"])
def test_prefill_logits_match(lm, prompts, hf_prefill, name):
    ids = prompts[name]
    ours, _, _ = lm.model.prefill(ids, all_logits=True)
    ref = hf_prefill[name][0]
    assert ours.shape == ref.shape == (len(ids), lm.model.cfg.vocab_size)
    assert ours.dtype == np.float32
    err = rel_err(ours, ref)
    record_rel_err("prefill logits", err)
    assert err < REL_TOL, f"{name}: relative error {err:.3g}"
    check_argmax_rows("prefill argmax (every position)", ours, ref)
    # the default (last position only) agrees with the all-position run
    last, _, _ = lm.model.prefill(ids)
    assert rel_err(last, ref[-1]) < REL_TOL


@pytest.mark.parametrize("name", ["short", "chat", "long"])
def test_prefill_kv_matches_hf_cache(lm, prompts, hf_prefill, name):
    """K after RoPE and V of every layer: catches an un-done GGUF Q/K permutation."""
    cfg = lm.model.cfg
    _, ks, vs = lm.model.prefill(prompts[name])
    ref_kv = hf_prefill[name][1]
    assert len(ks) == len(vs) == cfg.n_layers == len(ref_kv)
    for layer, (k, v, (rk, rv)) in enumerate(zip(ks, vs, ref_kv)):
        assert k.shape == v.shape == rk.shape == (len(prompts[name]), cfg.n_kv_heads, cfg.head_dim)
        ek, ev = rel_err(k, rk), rel_err(v, rv)
        record_rel_err("prefill K (after RoPE)", ek)
        record_rel_err("prefill V", ev)
        assert ek < REL_TOL and ev < REL_TOL, f"{name} layer {layer}: K err {ek:.3g}, V err {ev:.3g}"


def test_prefill_on_layer_callback_sees_every_layer(lm, prompts):
    seen = []
    _, ks, vs = lm.model.prefill(prompts["short"], on_layer=lambda i, k, v: seen.append((i, k, v)))
    assert [i for i, _, _ in seen] == list(range(lm.model.cfg.n_layers))
    for (_, k, v), k2, v2 in zip(seen, ks, vs):
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(v, v2)


@pytest.mark.parametrize("name", ["short", "chat", "long"])
def test_greedy_decode_matches_hf(lm, hf_model, prompts, name):
    """8 greedy steps via decode_step + DenseKVCache against transformers' incremental forward.

    Both sides are fed the reference's greedy token, so every step's logits are comparable; our
    argmax must agree unless the reference has a near-tie there (then the comparison stops).
    """
    cfg, ids = lm.model.cfg, prompts[name]
    runner = HFRunner(hf_model)
    ref = runner.forward(ids)[-1]
    ours, ks, vs = lm.model.prefill(ids)
    cache = DenseKVCache(cfg, batch=1, max_tokens=len(ids) + DECODE_STEPS)
    cache.load_prefill(0, ks, vs)
    ref_tokens = []
    for step in range(DECODE_STEPS):
        err = rel_err(ours, ref)
        record_rel_err("decode logits", err)
        assert err < REL_TOL, f"{name} step {step}: relative error {err:.3g}"
        tie = is_near_tie(ref)
        token = int(np.argmax(ref))
        diverged = int(np.argmax(ours)) != token
        TIES.note("greedy decode vs transformers", tie, diverged)
        assert not diverged or tie, f"{name} step {step}: argmax differs without a near-tie"
        if diverged:
            break
        ref_tokens.append(token)
        ref = runner.forward([token])[-1]
        assert cache.lengths[0] == len(ids) + step
        ours = lm.model.decode_step(np.array([token]), cache.lengths.copy(), cache)[0]
        assert cache.lengths[0] == len(ids) + step + 1
    # K/V written by decode steps match transformers' cache too
    n = int(cache.lengths[0])
    for layer in (0, cfg.n_layers // 2, cfg.n_layers - 1):
        rk, rv = runner.kv(layer)
        m = min(n, rk.shape[0])
        record_rel_err("decode K/V", max(rel_err(cache.k[layer, 0, :m], rk[:m]), rel_err(cache.v[layer, 0, :m], rv[:m])))
        assert rel_err(cache.k[layer, 0, :m], rk[:m]) < REL_TOL
        assert rel_err(cache.v[layer, 0, :m], rv[:m]) < REL_TOL
    # model.generation.greedy_reference follows the same path as far as the comparison went
    tokens, margins = greedy_reference(lm.model, ids, len(ref_tokens))
    assert tokens[:len(ref_tokens)] == ref_tokens
    assert len(margins) == len(tokens) and all(m >= 0 for m in margins)


def test_batched_decode_equals_unbatched(lm, prompts):
    """B=4 sequences of different lengths in one DenseKVCache give the same logits as one at a time."""
    cfg = lm.model.cfg
    names = ["one_token", "short", "code", "chat"]
    seqs = [prompts[n] for n in names]
    assert len({len(s) for s in seqs}) == 4
    max_tokens = max(len(s) for s in seqs) + DECODE_STEPS
    batched = DenseKVCache(cfg, batch=4, max_tokens=max_tokens)
    singles = []
    first = []
    for slot, ids in enumerate(seqs):
        logits, ks, vs = lm.model.prefill(ids)
        batched.load_prefill(slot, ks, vs)
        c = DenseKVCache(cfg, batch=1, max_tokens=max_tokens)
        c.load_prefill(0, ks, vs)
        singles.append(c)
        first.append(int(np.argmax(logits)))
    tokens = np.array(first)
    worst = 0.0
    for step in range(DECODE_STEPS):
        positions = batched.lengths.copy()
        out_b = lm.model.decode_step(tokens, positions, batched)  # (4, V)
        assert out_b.shape == (4, cfg.vocab_size)
        out_1 = np.stack([lm.model.decode_step(tokens[i:i + 1], singles[i].lengths.copy(), singles[i])[0]
                          for i in range(4)])
        for i in range(4):
            err = rel_err(out_b[i], out_1[i])
            worst = max(worst, err)
            assert err < 1e-5, f"sequence {i} step {step}: batched vs unbatched relative error {err:.3g}"
        check_argmax_rows("batched vs unbatched decode", out_b, out_1)
        np.testing.assert_array_equal(batched.lengths, [len(s) + step + 1 for s in seqs])
        tokens = np.argmax(out_1, axis=1)  # feed both the unbatched greedy choice
    record_rel_err("batched vs unbatched decode", worst)
