"""Performance model: time of a prefill batch, a decode step, a KV transfer; capacity.

HBM devices (Trainium, GPUs, the host CPU): roofline max(FLOPs / (peak x MFU), bytes / (bandwidth x
efficiency)) plus tensor-parallel all-reduces (2 per layer: latency + ring bytes / link) and fixed
per-layer and per-step costs. Wafer (CS-3): weights and KV stay in SRAM and layers are pipelined
across systems, so a token's latency is layers x per-layer latency + hops between systems; batch
work adds FLOPs / dense compute. Speculative decoding is an explicit option (`Speculative`).
The host CPU profile (`cpu`) carries tables measured on the live engine (PerfParams.measured):
prefill and decode-step times are interpolated from them instead of the roofline (single chip only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hardware.profiles import HardwareProfile, MeasuredTables
from model.specs import ModelSpec, dtype_bytes


@dataclass(frozen=True, slots=True)
class Speculative:
    """Draft-and-verify decoding: k draft tokens per step, each accepted with probability `acceptance`."""

    acceptance: float = 0.8  # assumption: typical for a same-family 8B draft on chat text
    draft_tokens: int = 3
    draft_model: str = "llama-3.1-8b"

    def tokens_per_step(self) -> float:
        """Expected tokens emitted per verification step (accepted drafts + the target's own)."""
        a, k = self.acceptance, self.draft_tokens
        return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


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
    """KV tokens that fit next to the weights in the replica's memory."""
    free = dep.chips * dep.hw.mem_bytes * dep.hw.perf.mem_usable - dep.model.weight_bytes(dep.dtype)
    return max(0, int(free // dep.model.kv_bytes_per_token(dep.kv_dtype)))


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


def _wafer_latency(dep: Deployment) -> float:
    p = dep.hw.perf
    hops = dep.chips if dep.chips > 1 else 0  # the sampled token returns to the first system
    return p.step_overhead_s + dep.model.n_layers * p.wafer_layer_latency_s + hops * p.wafer_hop_latency_s


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
    m, hw, p = dep.model, dep.hw, dep.hw.perf
    tokens = float(sum(lengths))
    flops = sum(m.prefill_flops(n) for n in lengths)
    if dep.is_wafer:
        compute = flops / (dep.chips * p.wafer_dense_flops * p.prefill_mfu)
        return compute + _wafer_latency(dep)
    if _tables(dep):  # the live engine, measured (one batched call)
        return _interp(tokens, p.measured.prefill_tokens, p.measured.prefill_s) + (
            p.prefill_extra_s * len(lengths) + p.prefill_extra_per_token_s * tokens)
    compute = flops / (dep.chips * hw.peak_flops(dep.dtype) * p.prefill_mfu)
    memory = (m.weight_bytes(dep.dtype) + m.kv_bytes_per_token(dep.kv_dtype) * tokens) / (
        dep.chips * hw.mem_bw * p.bw_eff)
    fixed = m.n_layers * p.layer_overhead_s + p.step_overhead_s
    return max(compute, memory) + _collectives(dep, tokens) + fixed


def decode_step_time(dep: Deployment, batch: int, ctx_sum: float, q_tokens: int = 1) -> float:
    """Seconds for one decode step of `batch` sequences holding ctx_sum cached tokens in total.

    q_tokens > 1 scores several positions per sequence at once (speculative verification).
    Linear in ctx_sum for a fixed batch, so the simulator can sum steps in closed form.
    """
    if batch <= 0:
        return 0.0
    m, hw, p = dep.model, dep.hw, dep.hw.perf
    tokens = batch * q_tokens
    flops = 2.0 * m.matmul_params_per_token() * tokens + _attn_flops(m, q_tokens, ctx_sum)
    kv_bytes = m.kv_bytes_per_token(dep.kv_dtype) * ctx_sum
    if dep.is_wafer:
        work = flops / (dep.chips * p.wafer_dense_flops * p.decode_mfu)
        bytes_ = (m.active_weight_bytes(dep.dtype, tokens) + kv_bytes) / (dep.chips * hw.mem_bw * p.bw_eff)
        return _wafer_latency(dep) + work + bytes_
    if _tables(dep):  # the live engine, measured
        return _measured_decode(p.measured, tokens, ctx_sum) + _token_overhead(p, tokens)
    compute = flops / (dep.chips * hw.peak_flops(dep.dtype) * p.decode_mfu)
    memory = (m.active_weight_bytes(dep.dtype, tokens) + kv_bytes) / (dep.chips * hw.mem_bw * p.bw_eff)
    fixed = m.n_layers * p.layer_overhead_s + p.step_overhead_s
    return max(compute, memory) + _collectives(dep, tokens) + fixed


def inter_token_latency(dep: Deployment, batch: int, context: int, spec: Speculative | None = None,
                        draft: Deployment | None = None) -> float:
    """Seconds between tokens of one user at a batch of equal contexts (speculative if `spec`)."""
    if spec is None:
        return decode_step_time(dep, batch, batch * context)
    assert draft is not None, "speculative decoding needs a draft deployment"
    k = spec.draft_tokens
    drafting = sum(decode_step_time(draft, batch, batch * (context + i)) for i in range(k))
    verify = decode_step_time(dep, batch, batch * context, q_tokens=k + 1)
    return (drafting + verify) / spec.tokens_per_step()


def token_step_time(dep: Deployment, batch: int, ctx_sum: float, spec: Speculative | None = None,
                    draft: Deployment | None = None) -> float:
    """Seconds per emitted token of each of `batch` sequences caching `ctx_sum` tokens in all: one decode
    step, or with `spec` a draft-and-verify step amortised over its expected tokens (mean context)."""
    if spec is None:
        return decode_step_time(dep, batch, ctx_sum)
    return inter_token_latency(dep, batch, max(1, int(ctx_sum / batch)), spec, draft)


def kv_transfer_time(src: Deployment, dst: Deployment, kv_bytes: float, prefill_s: float = 0.0) -> float:
    """Exposed seconds of moving a prompt's KV after its prefill ends, with layer-wise overlap.

    Layer i is sent as soon as it is computed, so all but the last layer's share of the transfer
    hides behind the prefill when the link keeps up; link = the slower side's network x efficiency.
    """
    bw = min(src.units * src.hw.net_bw * src.hw.perf.net_eff, dst.units * dst.hw.net_bw * dst.hw.perf.net_eff)
    wire = kv_bytes / bw
    layers = src.model.n_layers
    exposed = max(wire / layers, wire - prefill_s * (layers - 1) / layers)
    return src.hw.perf.net_latency_s + exposed
