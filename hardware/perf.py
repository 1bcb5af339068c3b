"""Performance model: time of a prefill batch, a decode step, a KV transfer; capacity.

HBM devices (Trainium, GPUs, the host CPU): roofline max(FLOPs / (peak x MFU), bytes / (bandwidth x
efficiency)) plus tensor-parallel all-reduces (2 per layer: latency + ring bytes / link) and fixed
per-layer and per-step costs. Wafer (CS-3): weights and KV stay in SRAM and layers are pipelined
across systems, so a token's latency is layers x per-layer latency + hops between systems; batch
work adds FLOPs of the active parameters / dense compute (MoE: SRAM holds all experts, so the systems
needed count total parameters, while compute counts the routed ones). The profile's software generation
(hardware/generations.py) sets the per-layer latency, the hop cost and whether it decodes speculatively.
Speculative decoding: an explicit option (`Speculative` plus a draft deployment), or the generation's own
(`speculation_plan`), both costing k draft steps (k + 1 with NxDI's KV-fill pass) plus one target pass over
k+1 tokens per step.
The host CPU profile (`cpu`) carries tables measured on the live engine (PerfParams.measured):
prefill and decode-step times are interpolated from them instead of the roofline (single chip only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hardware.profiles import HardwareProfile, MeasuredTables
from hardware.speculation import acceptance_rate, draft_candidates, expected_tokens
from model.specs import ModelSpec, dtype_bytes

PLAN_CONTEXT = 1000  # cached tokens per sequence at which speculation_plan picks its draft (short chat turns)


@dataclass(frozen=True, slots=True)
class Speculative:
    """Draft-and-verify decoding: k draft tokens per step, each accepted with probability `acceptance`."""

    acceptance: float = 0.8  # assumption: typical for a same-family 8B draft on chat text
    draft_tokens: int = 3  # drafts the target verifies per step (it scores them plus the previous token)
    draft_model: str = "llama-3.1-8b"
    # the draft also runs on its last draft each step, only to cache that token's KV (NxDI fused
    # speculation: its `speculation_length` k is draft_tokens k - 1 with this pass; neuronx-distributed-
    # inference models/model_base.py _token_gen_forward, "k iterations of the draft model ... extra run
    # is for populating the kv cache")
    kv_fill_pass: bool = False

    @property
    def draft_passes(self) -> int:
        """Draft forward passes per step."""
        return self.draft_tokens + self.kv_fill_pass

    def tokens_per_step(self) -> float:
        """Expected tokens emitted per verification step (accepted drafts + the target's own)."""
        return expected_tokens(self.acceptance, self.draft_tokens)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model replica: `units` rentable units of `hw`, tensor-parallel over `chips` chips."""

    model: ModelSpec
    hw: HardwareProfile
    chips: int  # chips the replica spans (wafer: pipelined systems)
    dtype: str = "bf16"
    kv_dtype: str = "bf16"

    @property
    def units(self) -> int:
        return math.ceil(self.chips / self.hw.chips)

    @property
    def tp(self) -> int:
        return self.chips * self.hw.tp_per_chip

    @property
    def is_wafer(self) -> bool:
        return self.hw.kind == "wafer"

    @property
    def price_per_hour(self) -> float:
        return self.units * self.hw.price_per_hour

    @property
    def power_kw(self) -> float:
        return self.units * self.hw.power_kw


def chips_needed(model: ModelSpec, hw: HardwareProfile, dtype: str = "bf16", kv_share: float = 0.0) -> int:
    """Fewest chips holding the weights (plus `kv_share` of memory for KV); powers of two on HBM."""
    usable = hw.mem_bytes * hw.perf.mem_usable * (1.0 - kv_share)
    n = max(1, math.ceil(model.weight_bytes(dtype) / usable))
    return n if hw.kind == "wafer" else 2 ** math.ceil(math.log2(n))


def make_deployment(model: ModelSpec, hw: HardwareProfile, tp: int | None = None, systems: int | None = None,
                    dtype: str = "bf16", kv_dtype: str = "bf16") -> Deployment:
    """Validated replica; default size: whole unit on Trainium instances, else just enough chips.

    ValueError (naming model, hardware and need) when the weights do not fit.
    """
    dtype_bytes(dtype), dtype_bytes(kv_dtype)
    if tp is not None and tp < 1 or systems is not None and systems < 1:
        raise ValueError("tp/systems: must be >= 1")
    if hw.kind == "wafer":
        chips = systems or chips_needed(model, hw, dtype)
    elif tp is not None:
        chips = math.ceil(tp / hw.tp_per_chip)
    elif systems is not None:
        chips = systems * hw.chips
    else:
        chips = max(hw.chips, chips_needed(model, hw, dtype, kv_share=0.2))
    dep = Deployment(model, hw, chips, dtype, kv_dtype)
    if model.weight_bytes(dtype) > chips * hw.mem_bytes * hw.perf.mem_usable:
        need = chips_needed(model, hw, dtype)
        what = f"{need} systems" if hw.kind == "wafer" else f"{need} chips (tp >= {need * hw.tp_per_chip})"
        raise ValueError(f"model {model.name} ({model.weight_bytes(dtype) / 1e9:.0f} GB at {dtype}) does not fit "
                         f"{hw.name} with {chips} chip(s) ({chips * hw.mem_bytes * hw.perf.mem_usable / 1e9:.0f} GB "
                         f"usable): needs {what}")
    return dep


def kv_token_capacity(dep: Deployment) -> int:
    """KV tokens that fit next to the weights in the replica's memory (and the generation's draft model's
    weights and KV, when it speculates)."""
    models = [dep.model] + ([plan[1].model] if (plan := speculation_plan(dep)) else [])
    free = dep.chips * dep.hw.mem_bytes * dep.hw.perf.mem_usable - sum(m.weight_bytes(dep.dtype) for m in models)
    return max(0, int(free // sum(m.kv_bytes_per_token(dep.kv_dtype) for m in models)))


def _attn_flops(model: ModelSpec, q_tokens: int, ctx_sum: float) -> float:
    """Attention FLOPs of q_tokens queries per sequence against a total of ctx_sum cached tokens."""
    return 4.0 * model.n_layers * model.n_heads * model.head_dim * ctx_sum * q_tokens


def _collectives(dep: Deployment, tokens: float) -> float:
    """Two ring all-reduces per layer of the activations of `tokens` tokens."""
    if dep.chips <= 1 or dep.is_wafer:
        return 0.0
    p = dep.hw.perf
    size = tokens * dep.model.d_model * dtype_bytes("bf16")
    ring = 2.0 * size * (dep.chips - 1) / dep.chips / dep.hw.link_bw
    return 2 * dep.model.n_layers * (p.collective_latency_s + ring)


_BY_ID: dict[tuple[str, int], tuple[Deployment, object]] = {}  # (what, id(dep)) -> (dep, value)


def _per_deployment(what: str, dep: Deployment, make):
    """make(dep), once per deployment object: looked up by identity, since hashing a Deployment (its
    model and profile) costs more than a decode step's arithmetic and the predictor times many steps."""
    got = _BY_ID.get((what, id(dep)))
    if got is None or got[0] is not dep:
        if len(_BY_ID) >= 512:
            _BY_ID.clear()
        got = _BY_ID[(what, id(dep))] = (dep, make(dep))
    return got[1]


def _memo(dep: Deployment) -> dict:
    """A new empty memo for one deployment's values (_per_deployment("...", dep, _memo))."""
    return {}


@dataclass(frozen=True, slots=True)
class _Wafer:
    """A wafer replica's step constants: the terms of _wafer_latency and wafer_work_s that do not depend
    on the step, each computed in the order those formulas evaluate it (so times are bit-identical)."""

    fixed_s: float  # step overhead + layers x per-layer latency / speedup
    hops: int  # system-to-system hops per pass (the sampled token returns to the first system)
    hop_s: float  # seconds per hop without async I/O
    async_io: bool  # activations on the wire: hop = wire + activation bytes / network
    wire_s: float
    d_model: int
    net_bw: float
    flops_per_token: float  # 2 x parameters multiplied per token
    attn_flops: float  # 4 x layers x heads x head_dim: attention FLOPs per cached token per query
    weight_bytes: float | None  # active weight bytes per step (None: MoE, they depend on the batch)
    kv_per_token: float  # KV bytes per cached token
    flops_rate: float  # chips x dense FLOP/s x decode MFU
    bytes_rate: float  # chips x SRAM bandwidth x efficiency


def _wafer(dep: Deployment) -> _Wafer:
    m, p, gen = dep.model, dep.hw.perf, dep.hw.generation
    speedup = gen.latency_speedup if gen else 1.0
    return _Wafer(p.step_overhead_s + m.n_layers * p.wafer_layer_latency_s / speedup, dep.chips if dep.chips > 1 else 0,
                  p.wafer_hop_latency_s, gen is not None and gen.async_io, gen.hop_wire_s if gen else 0.0, m.d_model,
                  dep.hw.net_bw, 2.0 * m.matmul_params_per_token(), 4.0 * m.n_layers * m.n_heads * m.head_dim,
                  None if m.is_moe else m.active_weight_bytes(dep.dtype), m.kv_bytes_per_token(dep.kv_dtype),
                  dep.chips * p.wafer_dense_flops * p.decode_mfu, dep.chips * dep.hw.mem_bw * p.bw_eff)


def _wafer_latency(w: _Wafer, tokens: float = 1.0) -> float:
    """Latency of one pass of `tokens` tokens through the pipelined systems, as the generation runs it."""
    if w.async_io:  # activations on the wire, I/O overlapped with compute
        hop = w.wire_s + tokens * w.d_model * dtype_bytes("bf16") / w.net_bw
    else:
        hop = w.hop_s
    return w.fixed_s + w.hops * hop


def _wafer_work(w: _Wafer, dep: Deployment, tokens: float, ctx_sum: float, q_tokens: int) -> float:
    flops = w.flops_per_token * tokens + w.attn_flops * ctx_sum * q_tokens
    weights = w.weight_bytes if w.weight_bytes is not None else dep.model.active_weight_bytes(dep.dtype, tokens)
    return flops / w.flops_rate + (weights + w.kv_per_token * ctx_sum) / w.bytes_rate


def wafer_work_s(dep: Deployment, tokens: int, ctx_sum: float, q_tokens: int = 1) -> float:
    """Seconds a wafer decode step adds to its latency: FLOPs of the parameters a token uses (MoE: routed
    experts only) over dense compute, plus active weight and KV bytes over SRAM bandwidth."""
    return _wafer_work(_per_deployment("wafer", dep, _wafer), dep, tokens, ctx_sum, q_tokens)


@dataclass(frozen=True, slots=True)
class _Roofline:
    """An HBM replica's prefill constants (prefill_time's terms that do not depend on the batch, each
    computed in the order that formula evaluates it, so times are bit-identical)."""

    compute_rate: float  # chips x peak FLOP/s x prefill MFU
    weight_bytes: float
    kv_per_token: float  # KV bytes per token written
    bytes_rate: float  # chips x HBM bandwidth x efficiency
    fixed_s: float  # layers x per-layer overhead + step overhead


def _roofline(dep: Deployment) -> _Roofline:
    m, hw, p = dep.model, dep.hw, dep.hw.perf
    return _Roofline(dep.chips * hw.peak_flops(dep.dtype) * p.prefill_mfu, m.weight_bytes(dep.dtype),
                     m.kv_bytes_per_token(dep.kv_dtype), dep.chips * hw.mem_bw * p.bw_eff,
                     m.n_layers * p.layer_overhead_s + p.step_overhead_s)


def _interp(x: float, xs: tuple, ys: tuple) -> float:
    """Piecewise-linear through (xs, ys); linear extrapolation past either end (never below 0)."""
    if len(xs) == 1:
        return float(ys[0])
    i = min(max(1, int(np.searchsorted(xs, x))), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _tables(dep: Deployment) -> bool:
    """Use the measured tables: the profile has them, for this model, on one chip."""
    t = dep.hw.perf.measured
    return t is not None and dep.chips == 1 and t.model == dep.model.name


def _measured_decode(t: MeasuredTables, tokens: int, ctx_sum: float) -> float:
    """Decode step from the measured tables: time at the reference context, plus a context slope."""
    base = _interp(tokens, t.decode_batches, t.decode_step_s)
    slope = _interp(tokens, t.slope_batches, t.decode_ctx_slope_s) if t.slope_batches else 0.0
    return max(0.1 * base, base + slope * (ctx_sum - tokens * t.decode_ref_ctx))


def _token_overhead(p, tokens: int) -> float:
    """Measured per-step serving overhead of the live decode worker (PerfParams.token_overhead_s)."""
    return _interp(tokens, p.token_overhead_batches, p.token_overhead_s) if p.token_overhead_s else 0.0


def prefill_time(dep: Deployment, lengths: list[int] | tuple[int, ...]) -> float:
    """Seconds to prefill a batch of prompts of the given lengths (from empty caches)."""
    m, p = dep.model, dep.hw.perf
    tokens = float(sum(lengths))
    memo: dict[int, float] = _per_deployment("prefill_flops", dep, _memo)  # prompt length -> FLOPs
    flops = 0
    for n in lengths:  # the same prompts recur: queued ones in every state of their queue, a newcomer's per pool
        f = memo.get(n)
        if f is None:
            if len(memo) >= 4096:
                memo.clear()
            f = memo[n] = m.prefill_flops(n)
        flops += f
    if dep.is_wafer:
        compute = flops / (dep.chips * p.wafer_dense_flops * p.prefill_mfu)
        return compute + _wafer_latency(_per_deployment("wafer", dep, _wafer), tokens)
    if _tables(dep):  # the live engine, measured (one batched call)
        return _interp(tokens, p.measured.prefill_tokens, p.measured.prefill_s) + (
            p.prefill_extra_s * len(lengths) + p.prefill_extra_per_token_s * tokens)
    r: _Roofline = _per_deployment("roofline", dep, _roofline)
    return max(flops / r.compute_rate, (r.weight_bytes + r.kv_per_token * tokens) / r.bytes_rate) + _collectives(
        dep, tokens) + r.fixed_s


def chunk_step_time(dep: Deployment, tokens: int) -> float:
    """Seconds a chunk of `tokens` prompt tokens adds to a forward pass that runs anyway (chunked
    prefill riding a decode step, as Sarathi-Serve batches them): the prompt's prefill time beyond a
    one-token pass, whose fixed latency the step already pays. 0 tokens: 0."""
    if tokens <= 0:
        return 0.0
    return max(0.0, prefill_time(dep, [tokens + 1]) - prefill_time(dep, [1]))


def decode_step_time(dep: Deployment, batch: int, ctx_sum: float, q_tokens: int = 1) -> float:
    """Seconds for one decode step (one forward pass) of `batch` sequences holding ctx_sum cached tokens in total.

    q_tokens > 1 scores several positions per sequence at once (speculative verification).
    Linear in ctx_sum for a fixed batch, so the simulator can sum steps in closed form.
    """
    if batch <= 0:
        return 0.0
    tokens = batch * q_tokens
    if dep.is_wafer:
        w: _Wafer = _per_deployment("wafer", dep, _wafer)
        return _wafer_latency(w, tokens) + _wafer_work(w, dep, tokens, ctx_sum, q_tokens)
    m, hw, p = dep.model, dep.hw, dep.hw.perf
    flops = 2.0 * m.matmul_params_per_token() * tokens + _attn_flops(m, q_tokens, ctx_sum)
    kv_bytes = m.kv_bytes_per_token(dep.kv_dtype) * ctx_sum
    if _tables(dep):  # the live engine, measured
        return _measured_decode(p.measured, tokens, ctx_sum) + _token_overhead(p, tokens)
    compute = flops / (dep.chips * hw.peak_flops(dep.dtype) * p.decode_mfu)
    memory = (m.active_weight_bytes(dep.dtype, tokens) + kv_bytes) / (dep.chips * hw.mem_bw * p.bw_eff)
    fixed = m.n_layers * p.layer_overhead_s + p.step_overhead_s
    return max(compute, memory) + _collectives(dep, tokens) + fixed


def _speculative_time(dep: Deployment, batch: int, ctx_sum: float, spec: Speculative, draft: Deployment) -> float:
    """Seconds per emitted token: the draft passes (contexts growing), one target pass over k+1 tokens, over
    the expected tokens per step. Linear in ctx_sum for a fixed batch, like decode_step_time."""
    k = spec.draft_tokens
    drafting = sum(decode_step_time(draft, batch, ctx_sum + batch * i) for i in range(spec.draft_passes))
    verify = decode_step_time(dep, batch, ctx_sum, q_tokens=k + 1)
    return (drafting + verify) / spec.tokens_per_step()


def _wafer_speculative(wt: _Wafer, dep: Deployment, wd: _Wafer, draft: Deployment, spec: Speculative, batch: float,
                       ctx_sum: float) -> float:
    """_speculative_time's draft passes plus the verify pass on a wafer target (constants `wt`) with a
    wafer draft (`wd`), batch > 0: decode_step_time's passes, the constants looked up once."""
    k = spec.draft_tokens
    hop = _wafer_latency(wd, batch)  # the same for every draft pass
    drafting = 0
    for i in range(spec.draft_passes):
        drafting += hop + _wafer_work(wd, draft, batch, ctx_sum + batch * i, 1)
    tokens = batch * (k + 1)
    return drafting + (_wafer_latency(wt, tokens) + _wafer_work(wt, dep, tokens, ctx_sum, k + 1))


def draft_room_bytes(dep: Deployment) -> float:
    """SRAM a draft model may use on a wafer replica: one system's share of what the target's weights leave
    free. Pipelined layers are balanced across the systems (the pipeline runs at its slowest stage's pace),
    so the free SRAM is spread evenly over them, and the draft runs on one of them, as a model that fits
    one wafer does (split across systems, every draft pass would cross the pipeline's hops as well)."""
    return (dep.chips * dep.hw.mem_bytes * dep.hw.perf.mem_usable - dep.model.weight_bytes(dep.dtype)) / dep.chips


@lru_cache(maxsize=256)
def speculation_plan(dep: Deployment) -> tuple[Speculative, Deployment] | None:
    """The generation's speculative decoding for this replica, or None (it does not speculate, or no draft helps).

    The (draft model, draft length) with the fastest single-user token at PLAN_CONTEXT, among registered
    drafts (hardware/speculation.py) whose weights fit one system's share of the SRAM the target leaves
    free (draft_room_bytes): the draft runs on one of the target's own wafers.
    """
    gen = dep.hw.generation
    if gen is None or not gen.speculative:
        return None
    free = draft_room_bytes(dep)
    best, best_s = None, decode_step_time(dep, 1, PLAN_CONTEXT)
    for model in draft_candidates(dep.model):
        if model.weight_bytes(dep.dtype) > free:
            continue
        draft = Deployment(model, dep.hw, chips_needed(model, dep.hw, dep.dtype), dep.dtype, dep.kv_dtype)
        acceptance = acceptance_rate(model, dep.model)
        for k in range(1, gen.max_draft_tokens + 1):
            spec = Speculative(acceptance, k, model.name)
            seconds = _speculative_time(dep, 1, PLAN_CONTEXT, spec, draft)
            if seconds < best_s:
                best, best_s = (spec, draft), seconds
    return best


def token_step_time(dep: Deployment, batch: int, ctx_sum: float, spec: Speculative | None = None,
                    draft: Deployment | None = None) -> float:
    """Seconds per emitted token of each of `batch` sequences caching `ctx_sum` tokens in all: one decode
    step, or a draft-and-verify step amortised over its expected tokens, with `spec` (and its `draft`
    deployment) or else the profile generation's speculation_plan."""
    return token_step(dep, spec, draft)(batch, ctx_sum)


@dataclass(frozen=True, slots=True)
class TokenStep:
    """token_step_time of one setup as a function of (batch, ctx_sum), bit-identical, its lookups done once
    (`token_step`): for a caller that times many steps of one setup (DecodeState)."""

    dep: Deployment
    spec: Speculative | None  # resolved: the explicit one or the generation's plan (None: plain steps)
    draft: Deployment | None
    wafers: tuple[_Wafer, _Wafer] | None  # (target, draft) constants when both are wafers
    per_step: float  # spec.tokens_per_step()

    def __call__(self, batch: float, ctx_sum: float) -> float:
        if self.spec is None:
            return decode_step_time(self.dep, batch, ctx_sum)
        if self.wafers is None or batch <= 0:
            return _speculative_time(self.dep, batch, ctx_sum, self.spec, self.draft)
        return _wafer_speculative(self.wafers[0], self.dep, self.wafers[1], self.draft, self.spec, batch,
                                  ctx_sum) / self.per_step


def token_step(dep: Deployment, spec: Speculative | None = None, draft: Deployment | None = None) -> TokenStep:
    """token_step_time's setup resolved once (the generation's plan when `spec` is None: per deployment)."""
    if spec is None:
        return _per_deployment("token_step", dep, _planned_step)
    return _token_step(dep, spec, draft)


def _planned_step(dep: Deployment) -> TokenStep:
    return _token_step(dep, *(speculation_plan(dep) or (None, None)))


def _token_step(dep: Deployment, spec: Speculative | None, draft: Deployment | None) -> TokenStep:
    if spec is None:
        return TokenStep(dep, None, None, None, 1.0)
    assert draft is not None, "speculative decoding needs a draft deployment"
    wafers = (_per_deployment("wafer", dep, _wafer), _per_deployment("wafer", draft, _wafer)) if (
        dep.is_wafer and draft.is_wafer) else None
    return TokenStep(dep, spec, draft, wafers, spec.tokens_per_step())


def inter_token_latency(dep: Deployment, batch: int, context: int, spec: Speculative | None = None,
                        draft: Deployment | None = None) -> float:
    """Seconds between tokens of one user at a batch of equal contexts (token_step_time)."""
    return token_step_time(dep, batch, batch * context, spec, draft)


def kv_transfer_time(src: Deployment, dst: Deployment, kv_bytes: float, prefill_s: float = 0.0) -> float:
    """Exposed seconds of moving a prompt's KV after its prefill ends, with layer-wise overlap.

    Layer i is sent as soon as it is computed, so all but the last layer's share of the transfer
    hides behind the prefill when the link keeps up; link = the slower side's network x efficiency.
    """
    links: dict[int, tuple[Deployment, float]] = _per_deployment("links", src, _memo)  # id(dst) -> (dst, bytes/s)
    got = links.get(id(dst))
    if got is None or got[0] is not dst:
        got = links[id(dst)] = (dst, min(src.units * src.hw.net_bw * src.hw.perf.net_eff,
                                         dst.units * dst.hw.net_bw * dst.hw.perf.net_eff))
    wire = kv_bytes / got[1]
    layers = src.model.n_layers
    exposed = max(wire / layers, wire - prefill_s * (layers - 1) / layers)
    return src.hw.perf.net_latency_s + exposed

