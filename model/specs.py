"""Architecture specs of big models for performance modelling: shapes only, no weights.

Parameter, byte and FLOP accounting used by hardware/ and the simulator. Figures are from the
models' published config.json files (Hugging Face model cards); published totals are in
`PUBLISHED_PARAMS` and checked by tests/model/test_specs.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "mxfp4": 0.5, "int4": 0.5,
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a dtype name; ValueError listing the valid names otherwise."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"dtype: unknown {dtype!r}; valid: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A decoder-only transformer. MoE layers replace the dense FFN by routed (+ shared) experts."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int  # dense FFN width (SwiGLU: gate, up, down)
    vocab_size: int
    tied_embeddings: bool
    n_experts: int = 0  # routed experts per MoE layer (0: dense model)
    experts_active: int = 0  # routed experts per token
    n_shared_experts: int = 0
    d_ff_expert: int = 0  # width of one expert's FFN
    moe_every: int = 1  # every k-th layer is MoE (layer i is MoE when (i - first_dense + 1) % moe_every == 0)
    first_dense: int = 0  # the first layers are dense before the MoE pattern starts (GLM-4.5: 3)
    attn_window: int = 0  # sliding/chunked attention window (0: none)
    window_every: int = 0  # layers with a window: all except every window_every-th (0: no windows)
    # fine-tuning data other than its vendor family's own ("" for those): a DeepSeek-R1 distill is tuned on
    # R1's outputs, Perplexity's Sonar on its search answers. Speculative drafts must match it
    # (hardware/speculation.py draft_candidates).
    tuned_on: str = ""
    # parameter counts the perf model reads on every step, computed once (the predictor's hot path)
    _matmul_params: int = field(init=False, repr=False, compare=False)
    _params_total: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, f"{self.name}: heads not a multiple of KV heads"
        assert (self.n_experts == 0) == (self.experts_active == 0), f"{self.name}: experts inconsistent"
        emb = self.embedding_params * (1 if self.tied_embeddings else 2)
        body = self.n_layers * self.attn_params_per_layer + self.n_dense_layers * self._ffn(self.d_ff)
        moe = self.n_moe_layers * self._moe_layer_params(self.n_experts)
        object.__setattr__(self, "_params_total", emb + body + moe)
        object.__setattr__(self, "_matmul_params", self._body_active() + self.embedding_params)

    # ---- structure -------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_moe_layers(self) -> int:
        return (self.n_layers - self.first_dense) // self.moe_every if self.is_moe else 0

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def n_windowed_layers(self) -> int:
        if not self.attn_window or not self.window_every:
            return 0
        return self.n_layers - self.n_layers // self.window_every

    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers."""
        if not self.is_moe:
            return ()
        start = self.first_dense
        return tuple(i for i in range(start, self.n_layers) if (i - start + 1) % self.moe_every == 0)

    # ---- parameters ------------------------------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        q = self.d_model * self.n_heads * self.head_dim
        kv = 2 * self.d_model * self.n_kv_heads * self.head_dim
        return q + kv + self.n_heads * self.head_dim * self.d_model

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    def _ffn(self, width: int) -> int:
        return 3 * self.d_model * width

    def _moe_layer_params(self, experts: int) -> int:
        router = self.d_model * self.n_experts
        return (experts + self.n_shared_experts) * self._ffn(self.d_ff_expert) + router

    def params_total(self) -> int:
        """All parameters (norms ignored: < 0.01%)."""
        return self._params_total

    def params_active(self, count_input_embedding: bool = True) -> int:
        """Parameters touched per token: only the routed experts a token uses.

        Vendors differ on whether the input embedding (a lookup, not a matmul) counts; Meta counts
        it for Llama 4 (17B), OpenAI does not for gpt-oss (5.1B).
        """
        if self.tied_embeddings:
            return self._body_active() + self.embedding_params
        return self._body_active() + self.embedding_params * (2 if count_input_embedding else 1)

    def _body_active(self) -> int:
        body = self.n_layers * self.attn_params_per_layer + self.n_dense_layers * self._ffn(self.d_ff)
        return body + self.n_moe_layers * self._moe_layer_params(self.experts_active)

    def matmul_params_per_token(self) -> int:
        """Parameters multiplied per token: active blocks plus the output layer (no embedding lookup)."""
        return self._matmul_params

    # ---- bytes -----------------------------------------------------------------------------
    def weight_bytes(self, dtype: str = "bf16") -> float:
        return self.params_total() * dtype_bytes(dtype)

    def active_weight_bytes(self, dtype: str = "bf16", batch: int = 1) -> float:
        """Weight bytes one decode step reads for `batch` tokens (MoE: experts hit by the batch)."""
        if not self.is_moe:
            return self.matmul_params_per_token() * dtype_bytes(dtype)
        hit = self.n_experts * (1.0 - (1.0 - self.experts_active / self.n_experts) ** max(batch, 1))
        base = self.matmul_params_per_token() - self.n_moe_layers * self.experts_active * self._ffn(self.d_ff_expert)
        return (base + self.n_moe_layers * hit * self._ffn(self.d_ff_expert)) * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "bf16") -> float:
        """K and V of one token over all layers (full-attention upper bound)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes(dtype)

    def kv_bytes(self, context: int, dtype: str = "bf16") -> float:
        """KV bytes of one sequence at `context` tokens, windowed layers capped at their window."""
        per_layer_tok = 2 * self.n_kv_heads * self.head_dim * dtype_bytes(dtype)
        full = self.n_layers - self.n_windowed_layers
        win = min(context, self.attn_window) if self.n_windowed_layers else 0
        return per_layer_tok * (full * context + self.n_windowed_layers * win)

    # ---- FLOPs -----------------------------------------------------------------------------
    def _attn_flops(self, q_tokens: int, prefix: int) -> float:
        """QK^T and AV FLOPs for q_tokens causal queries after `prefix` cached tokens."""
        pairs_full = q_tokens * prefix + q_tokens * (q_tokens + 1) / 2
        per_pair = 4 * self.n_heads * self.head_dim
        full = self.n_layers - self.n_windowed_layers
        flops = full * per_pair * pairs_full
        if self.n_windowed_layers:
            w = self.attn_window
            pairs_win = sum(min(prefix + i + 1, w) for i in range(q_tokens)) if q_tokens <= 4096 else \
                q_tokens * min(prefix + q_tokens / 2, w)
            flops += self.n_windowed_layers * per_pair * pairs_win
        return flops

    def prefill_flops(self, n_tokens: int, prefix: int = 0) -> float:
        """FLOPs of prefilling n tokens (logits for the last one only), attention's quadratic term included."""
        linear = 2 * (self.matmul_params_per_token() - self.embedding_params) * n_tokens
        return linear + 2 * self.embedding_params + self._attn_flops(n_tokens, prefix)

    def decode_flops(self, context: int) -> float:
        """FLOPs of one decode step of one sequence whose cache holds `context` tokens."""
        return 2 * self.matmul_params_per_token() + self._attn_flops(1, context)


def _llama(name, layers, d, heads, kv, ff, vocab, tied=False, head_dim=128, tuned_on="") -> ModelSpec:
    return ModelSpec(name, layers, d, heads, kv, head_dim, ff, vocab, tied, tuned_on=tuned_on)


SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json; also the GGUF metadata of the live model
    _llama("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tied=True, head_dim=64),
    _llama("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),  # meta-llama/Llama-2-70b-hf
    _llama("llama-3.2-1b", 16, 2048, 32, 8, 8192, 128256, tied=True, head_dim=64),  # meta-llama/Llama-3.2-1B
    _llama("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256),  # meta-llama/Llama-3.1-8B
    _llama("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256),  # meta-llama/Llama-3.1-70B
    _llama("llama-3.3-70b", 80, 8192, 64, 8, 28672, 128256),  # meta-llama/Llama-3.3-70B-Instruct
    # deepseek-ai/DeepSeek-R1-Distill-Llama-70B: Llama-3.3-70B-Instruct fine-tuned on R1's reasoning traces
    _llama("deepseek-r1-distill-llama-70b", 80, 8192, 64, 8, 28672, 128256, tuned_on="deepseek-r1 outputs"),
    # Perplexity Sonar (Jan 2025): Llama 3.3 70B post-trained by Perplexity for search-grounded answers (closed
    # weights; the architecture is its base's)
    _llama("perplexity-sonar", 80, 8192, 64, 8, 28672, 128256, tuned_on="perplexity search answers"),
    _llama("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256),  # meta-llama/Llama-3.1-405B
    # meta-llama/Llama-4-Maverick-17B-128E: 128 routed + 1 shared expert, top-1, MoE on every 2nd
    # layer (interleave_moe_layer_step 2), dense layers 16384 wide; chunked attention (8192) on
    # 3 of 4 layers. Text model only.
    ModelSpec("llama-4-maverick", 48, 5120, 40, 8, 128, 16384, 202048, False,
              n_experts=128, experts_active=1, n_shared_experts=1, d_ff_expert=8192, moe_every=2,
              attn_window=8192, window_every=4),
    # openai/gpt-oss-120b: 36 layers all MoE, 128 experts top-4 of width 2880; alternating
    # 128-token sliding-window and full attention.
    ModelSpec("gpt-oss-120b", 36, 2880, 64, 8, 64, 2880, 201088, False,
              n_experts=128, experts_active=4, d_ff_expert=2880, moe_every=1,
              attn_window=128, window_every=2),
    # openai/gpt-oss-20b: 24 layers all MoE, 32 experts top-4 of width 2880; attention as gpt-oss-120b.
    ModelSpec("gpt-oss-20b", 24, 2880, 64, 8, 64, 2880, 201088, False,
              n_experts=32, experts_active=4, d_ff_expert=2880, moe_every=1,
              attn_window=128, window_every=2),
    # meta-llama/Llama-4-Scout-17B-16E: 16 routed + 1 shared expert, top-1, MoE on every layer; attention as
    # Maverick's. Text model only.
    ModelSpec("llama-4-scout", 48, 5120, 40, 8, 128, 16384, 202048, False,
              n_experts=16, experts_active=1, n_shared_experts=1, d_ff_expert=8192, moe_every=1,
              attn_window=8192, window_every=4),
    _llama("qwen3-0.6b", 28, 1024, 16, 8, 3072, 151936, tied=True),  # Qwen/Qwen3-0.6B
    _llama("qwen3-32b", 64, 5120, 64, 8, 25600, 151936),  # Qwen/Qwen3-32B
    # Qwen/Qwen3-235B-A22B: 94 layers all MoE, 128 experts top-8 of width 1536, no shared expert.
    ModelSpec("qwen3-235b-a22b", 94, 4096, 64, 4, 128, 12288, 151936, False,
              n_experts=128, experts_active=8, d_ff_expert=1536, moe_every=1),
    # Qwen/Qwen3-Coder-480B-A35B-Instruct: 62 layers all MoE, 160 experts top-8 of width 2560, 96 query heads.
    ModelSpec("qwen3-coder-480b-a35b", 62, 6144, 96, 8, 128, 8192, 151936, False,
              n_experts=160, experts_active=8, d_ff_expert=2560, moe_every=1),
    # zai-org/GLM-4.5 (GLM-4.6 and 4.7 keep its 355B-A32B architecture): 3 dense layers 12288 wide, then 89
    # MoE, 160 routed experts top-8 of width 1536 plus 1 shared, 96 query heads of 128 on a 5120 residual.
    ModelSpec("glm-4.7", 92, 5120, 96, 8, 128, 12288, 151552, False,
              n_experts=160, experts_active=8, n_shared_experts=1, d_ff_expert=1536, first_dense=3),
)}

# Published totals (and active counts for MoE), in parameters.
PUBLISHED_PARAMS: dict[str, tuple[float, float | None]] = {
    "smollm2-135m": (134.5e6, None),  # HF model card: 135M (134,515,008 in the safetensors)
    "llama-2-70b": (70e9, None),
    "llama-3.2-1b": (1.24e9, None),  # HF model card: 1.23B (1,235,814,400 in the safetensors)
    "llama-3.1-8b": (8.03e9, None),
    "llama-3.1-70b": (70.6e9, None),
    "llama-3.3-70b": (70.6e9, None),
    "deepseek-r1-distill-llama-70b": (70.6e9, None),  # its base's (Llama 3.3 70B) architecture and size
    "perplexity-sonar": (70.6e9, None),  # its base's (Llama 3.3 70B)
    "llama-3.1-405b": (405.9e9, None),
    "llama-4-maverick": (400e9, 17e9),  # Meta: 17B active, 400B total
    "gpt-oss-120b": (116.8e9, 5.13e9),  # OpenAI model card: 116.8B total, 5.13B active
    "gpt-oss-20b": (20.9e9, 3.6e9),  # OpenAI model card: 20.9B total, 3.6B active
    "qwen3-0.6b": (0.6e9, None),  # Qwen model card: 0.6B (0.44B non-embedding)
    "qwen3-32b": (32.8e9, None),
    "qwen3-235b-a22b": (235e9, 22e9),  # Qwen model card: 235B total, 22B activated
    "llama-4-scout": (109e9, 17e9),  # Meta: 17B active, 109B total
    "qwen3-coder-480b-a35b": (480e9, 35e9),  # Qwen model card: 480B total, 35B activated
    "glm-4.7": (355e9, 32e9),  # Z.ai (GLM-4.5 model card): 355B total, 32B active
}


def get_spec(name: str) -> ModelSpec:
    """Spec by registry name; ValueError listing the valid names otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"model: unknown {name!r}; valid: {', '.join(SPECS)}") from None


def spec_from_config(cfg) -> ModelSpec:
    """A ModelSpec from a loaded `model.config.ModelConfig` (the live SmolLM2)."""
    return ModelSpec(cfg.name, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                     cfg.d_ff, cfg.vocab_size, cfg.tied_embeddings)
