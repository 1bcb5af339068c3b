"""Hardware profiles: datasheet figures with their sources, plus named performance coefficients.

Datasheet figures come from ../shared/reference/hardware-specs.md (grades [A] vendor docs, [B] vendor
press, [C] secondary). Every coefficient that is *not* a datasheet figure lives in `PerfParams`
with a comment saying what it means and where its value comes from (assumption or calibration,
see bench/calibration.py), or in the profile's software `Generation` (hardware/generations.py: one
profile per CS-3 generation, `cs3` naming the newest). Price and power are editable assumptions, not quotes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hardware.generations import GENERATIONS, Generation, generation_names, newest, profile_name

GB = 1e9
GIB = 2**30
TB = 1e12


@dataclass(frozen=True, slots=True)
class MeasuredTables:
    """Step times measured on the live engine itself (only the `cpu` profile has them; hardware/cpu.py).

    When a profile carries these, hardware/perf.py interpolates them (piecewise-linear, linear
    extrapolation past the last point) instead of the analytic roofline, because the live numpy
    engine at 1 BLAS thread is not roofline-shaped: OpenBLAS packs the weights for every GEMM, so a
    decode step jumps from batch 1 to batch 2 and then grows slowly.
    """

    model: str  # model spec name the tables were measured with (model/specs.py); other models: analytic
    decode_batches: tuple[int, ...]  # batch sizes of the decode-step table (ascending)
    decode_step_s: tuple[float, ...]  # seconds per step (forward + sampling) at decode_ref_ctx per sequence
    decode_ref_ctx: int  # cached tokens per sequence in the decode-step table
    slope_batches: tuple[int, ...]  # batch sizes at which the context slope was measured (ascending)
    decode_ctx_slope_s: tuple[float, ...]  # extra seconds per extra cached token (summed over the batch)
    prefill_tokens: tuple[int, ...]  # prompt tokens in one Transformer.prefill_batch call (ascending)
    prefill_s: tuple[float, ...]  # seconds of that call


@dataclass(frozen=True, slots=True)
class PerfParams:
    """Non-datasheet coefficients of the performance model (all editable, all documented)."""

    prefill_mfu: float = 0.5  # fraction of dense peak a prefill achieves (assumption unless calibrated)
    decode_mfu: float = 0.5  # fraction of dense peak in a compute-bound decode step (assumption)
    bw_eff: float = 0.7  # fraction of memory bandwidth a decode step achieves (assumption)
    collective_latency_s: float = 20e-6  # fixed cost of one tensor-parallel all-reduce (2 per layer)
    layer_overhead_s: float = 0.0  # fixed per-layer cost per forward pass (kernel launch, sync)
    step_overhead_s: float = 0.0  # fixed cost per forward pass (sampling, host round trip)
    net_eff: float = 0.8  # fraction of the external network bandwidth a KV transfer achieves
    net_latency_s: float = 50e-6  # setup latency of one KV transfer
    mem_usable: float = 0.9  # fraction of device memory usable for weights + KV (runtime, activations)
    # wafer-scale (pipelined, weights in SRAM) only:
    wafer_layer_latency_s: float = 0.0  # latency of one transformer block for one token
    wafer_hop_latency_s: float = 0.0  # activation hop between pipelined systems (per hop)
    wafer_dense_flops: float = 0.0  # dense FP16 compute per system (not published; estimate)
    # host CPU (`cpu`) only: measured tables of the live engine, and co-run slowdowns. The live
    # prefill and decode actors share the host's cores (and caches, memory bus); while one computes,
    # the other's step takes this many times longer (bench/serving_overheads.py; 1.0 = no effect).
    measured: MeasuredTables | None = None
    corun_slowdown_prefill: float = 1.0  # prefill time factor while the decode actor is stepping
    corun_slowdown_decode: float = 1.0  # decode step factor while the prefill actor is computing
    # host CPU only, measured on the idle live stack by bench/serving_overheads.py (0 / empty = none):
    prefill_extra_s: float = 0.0  # prefill worker time per request beyond prefill_batch (KV send, commit)
    prefill_extra_per_token_s: float = 0.0  # ... and per prompt token (KV bytes framed and sent)
    request_path_s: float = 0.0  # frontend + Ray + gRPC latency added to TTFT (occupies no worker)
    token_overhead_batches: tuple[int, ...] = ()  # batches at which the per-token overhead was measured
    token_overhead_s: tuple[float, ...] = ()  # client TPOT minus the in-process step (polls, streaming)


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """One rentable unit (instance, GPU or wafer system) built from `chips` identical chips."""

    name: str
    kind: str  # "hbm" (Trainium, GPU), "wafer" (CS-3) or "cpu"
    chips: int  # chips per unit
    tp_per_chip: int  # tensor-parallel ranks per chip (Trn2/Trn3: 4 logical cores at LNC=2)
    flops_bf16: float  # dense BF16 FLOP/s per chip
    flops_fp8: float  # dense FP8 FLOP/s per chip
    mem_bytes: float  # device memory per chip (HBM, or on-wafer SRAM)
    mem_bw: float  # memory bandwidth per chip, B/s
    link_bw: float  # chip-to-chip (tensor-parallel) bandwidth per chip, B/s
    net_bw: float  # external network per unit (EFA / Ethernet), B/s: carries the KV cache
    price_per_hour: float  # $ per unit-hour (editable assumption)
    power_kw: float  # kW per unit (editable assumption)
    perf: PerfParams = field(default_factory=PerfParams)
    default_dtype: str = "bf16"  # weight dtype when none is given (the live cpu engine runs fp32)
    sources: tuple[str, ...] = ()
    generation: Generation | None = None  # software generation (hardware/generations.py); None: not modelled

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak per chip for the weight dtype (fp8 and narrower run at the FP8 rate)."""
        return self.flops_fp8 if dtype in ("fp8", "int8", "mxfp4", "int4") else self.flops_bf16


NEURON = "aws-neuron-sdk trainium*.rst / trn*-arch.rst [A]"
# Calibrated against trn2.48xlarge TP64 Llama-3.3-70B: TTFT 0.576 s, ITL 19.8 ms (bench/calibration.py).
TRN_PERF = PerfParams(prefill_mfu=0.269, decode_mfu=0.3, bw_eff=0.6, collective_latency_s=88.7e-6,
                      step_overhead_s=0.5e-3)
GPU_PERF = PerfParams(prefill_mfu=0.5, decode_mfu=0.4, bw_eff=0.75, collective_latency_s=15e-6,
                      step_overhead_s=0.3e-3)  # assumptions (typical vLLM/TRT-LLM figures), uncalibrated
# CS-3, launch generation: layer latency solved from Llama 3.1 8B at 1,800 tok/s/user on 1 system; hop
# latency from Llama 3.1 70B at 450 tok/s/user on 4 systems (Aug 2024, 16-bit). Dense compute: 16 PF estimate.
# Later generations change these through their Generation terms (hardware/generations.py), not here.
CS3_PERF = PerfParams(prefill_mfu=0.3, decode_mfu=0.5, bw_eff=0.5, step_overhead_s=50e-6,
                      wafer_layer_latency_s=15.7e-6, wafer_hop_latency_s=227e-6, wafer_dense_flops=16e15,
                      mem_usable=0.9)


def _trn(name, chips, tp_per_chip, bf16, fp8, mem, bw, link, net, price, power, extra_src) -> HardwareProfile:
    return HardwareProfile(name, "hbm", chips, tp_per_chip, bf16, fp8, mem, bw, link, net, price, power,
                           TRN_PERF, sources=(NEURON, extra_src, "price/power: editable assumptions"))


def _cs3(gen: Generation) -> HardwareProfile:
    """Cerebras CS-3 (WSE-3): 44 GB SRAM at 21 PB/s [B]; 125 PF is *sparse* FP16 [B], dense unpublished (16 PF
    estimate in PerfParams.wafer_dense_flops); I/O 12 x 100 GbE = 150 GB/s [B/C]; ~23 kW [C]. No public price:
    $100/h assumes ~$2.5M amortised over 3 years plus hosting."""
    return HardwareProfile(
        profile_name("cs3", gen), "wafer", 1, 1, 125e15 / 8, 125e15 / 8, 44 * GB, 21e15, 150 * GB, 150 * GB,
        100.0, 23.0, CS3_PERF, generation=gen,
        sources=("hardware-specs.md s2: Cerebras launch Mar 2024 [B], ALCF guide [A], argonne SC24 [B]",
                 "layer/hop latency: calibrated, Cerebras inference blog Aug 2024 [B]",
                 *gen.sources, "price: assumption; power ~23 kW [C]"))


PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (
    # Trainium1 chip: 190 TF BF16 (cFP8 at the same rate), 32 GiB at 0.82 TB/s, NeuronLink-v2 384 GB/s.
    _trn("trn1", 1, 2, 190e12, 190e12, 32 * GIB, 820 * GIB, 384 * GB, 800e9 / 8 / 16, 21.50 / 16, 0.5,
         "trainium.rst; trn2 comparison table"),
    # trn1.32xlarge: 16 chips, 32 NeuronCores, 512 GiB HBM, EFA 800 Gbps. $21.50/h us-east-1 on-demand (assumed).
    _trn("trn1.32xlarge", 16, 2, 190e12, 190e12, 32 * GIB, 820 * GIB, 384 * GB, 800e9 / 8, 21.50, 8.0,
         "trn1-arch.rst"),
    # Trainium2 chip: 667 TF BF16, 1,299 TF FP8, 96 GiB HBM at 2.9 TB/s, 8 NeuronCores (4 logical at LNC=2),
    # NeuronLink-v3 1.28 TB/s per chip.
    _trn("trn2", 1, 4, 667e12, 1299e12, 96 * GIB, 2.9 * TB, 1.28 * TB, 3200e9 / 8 / 16, 46.0 / 16, 0.6,
         "trainium2.rst; neuron-core-v3.rst"),
    # trn2.48xlarge: 16 chips, 64 logical cores (max TP 64), 1,536 GiB, 46.4 TB/s, EFA 3.2 Tbps (400 GB/s).
    _trn("trn2.48xlarge", 16, 4, 667e12, 1299e12, 96 * GIB, 2.9 * TB, 1.28 * TB, 3200e9 / 8, 46.0, 10.0,
         "trn2-arch.rst"),
    # Trainium3 chip: 671 TF BF16, 2,517 TF MXFP8, 144 GiB at 4.9 TB/s, NeuronLink-v4 2.56 TB/s;
    # EFA about 25 GB/s per chip (28,800 Gbps over 144 chips).
    _trn("trn3", 1, 4, 671e12, 2517e12, 144 * GIB, 4.9 * TB, 2.56 * TB, 25e9, 4.0, 0.8,
         "trainium3.rst; trn3-arch.rst"),
    # Cerebras CS-3 (WSE-3), one profile per software generation (_cs3).
    *(_cs3(g) for g in GENERATIONS["cs3"]),
    # GPUs (per GPU): hardware-specs.md s6a, glennklockwood.com [C], hmc-tech.com [C]. NVLink 900 GB/s
    # (H100/H200), 1.8 TB/s (B200) and 50 GB/s network per GPU (400 Gb/s NIC) are assumptions.
    HardwareProfile("h100", "hbm", 1, 1, 989e12, 1979e12, 80 * GB, 3.35 * TB, 900 * GB, 50 * GB, 3.0, 1.0,
                    GPU_PERF, sources=("hardware-specs.md s6a [C]", "price/power: editable assumptions")),
    HardwareProfile("h200", "hbm", 1, 1, 989e12, 1979e12, 141 * GB, 4.8 * TB, 900 * GB, 50 * GB, 3.8, 1.0,
                    GPU_PERF, sources=("hardware-specs.md s6a [C]", "price/power: editable assumptions")),
    HardwareProfile("b200", "hbm", 1, 1, 2250e12, 4500e12, 192 * GB, 8 * TB, 1800 * GB, 50 * GB, 5.5, 1.2,
                    GPU_PERF, sources=("hardware-specs.md s6a [C]", "price/power: editable assumptions")),
)}
HARDWARE_NAMES = tuple(GENERATIONS) + tuple(PROFILES) + ("cpu",)


def canonical_name(name: str) -> str:
    """The profile name `name` selects: a family's bare name is its newest generation (`cs3` -> `cs3@2024-10`).

    ValueError naming the known names: for an unknown generation, the family's generations."""
    if name in GENERATIONS:
        return newest(name)
    if name in PROFILES or name == "cpu":
        return name
    family, _, gen = name.partition("@")
    if gen and family in GENERATIONS:
        raise ValueError(f"hardware: unknown {family} generation {gen!r} in {name!r}; known: "
                         f"{', '.join(generation_names(family))} (bare {family!r} is the newest)")
    raise ValueError(f"hardware: unknown {name!r}; valid: {', '.join(HARDWARE_NAMES)}")


def get_profile(name: str) -> HardwareProfile:
    """Profile by name (canonical_name); `cpu` is this host's cached measurement (hardware/cpu.py)."""
    name = canonical_name(name)
    if name == "cpu":
        from hardware.cpu import cpu_profile
        return cpu_profile()
    return PROFILES[name]
