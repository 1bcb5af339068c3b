"""The live bench's prompts (bench/live.py prompt_ids), which `bench`, `chaos` and `bench.loadgen` send."""
from __future__ import annotations


def test_bench_prompts_put_the_body_inside_the_user_message():
    """The bench's prompts (which both load generators send): exactly n tokens, the filler closing the user's
    message and the assistant's turn opened after it, not spliced into "<|im_start|>assistant"."""
    from bench.live import FILLER, prompt_ids
    from model.loaded import load_model

    tok = load_model().tokenizer
    filler = tok.encode(FILLER)
    closing = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    for n in (12, 60, 300):
        ids = prompt_ids(tok, n, filler, 3)
        assert len(ids) == n
        if n > 12:
            assert ids[-len(closing):] == closing and ids[-len(closing) - 1] in filler
            assert "user\nRequest 3. Summarise:The history" in tok.decode(ids, skip_special_tokens=False)
