"""Software generations: the same silicon served by a vendor's software stack as of a date.

A CS-3 running Llama 3.1 70B in August 2024 (450 tok/s/user) and in October 2024 (2,100) is the same
wafer; what changed is software (hardware-specs.md s2a): rewritten MatMul and reduce/broadcast
kernels, wafer I/O run asynchronously from compute, and speculative decoding. A profile names its
generation as `family@date` (`cs3@2024-10`); the bare family name (`cs3`) is the newest one.

Each term is its own field, so a generation is a model, not a per-model factor:

- `latency_speedup`: the rewritten kernels divide the launch's per-layer latency (the one fitted term);
- `async_io`: a hop between pipelined systems costs its wire time (activation bytes over the system's
  I/O plus `hop_wire_s`) instead of the launch's measured synchronous hop;
- `max_draft_tokens` > 0: speculative decoding, with the draft model and draft length the performance
  model chooses (hardware/perf.py `speculation_plan`, acceptance in hardware/speculation.py).
"""
from __future__ import annotations

from dataclasses import dataclass

OCT_2024_RELEASE = ("Cerebras Oct 2024 release text, quoted at hn.masterscheme.cn/item?id=41942822 [B]: "
                    "MatMul, reduce/broadcast, element-wise kernels rewritten; wafer IO asynchronous from compute; "
                    "speculative decoding")


@dataclass(frozen=True, slots=True)
class Generation:
    """What one software generation changes in the wafer performance model (defaults: the launch's)."""

    name: str  # the date tag in a profile name: "2024-10" in "cs3@2024-10"
    label: str  # "launch", "speculative"
    latency_speedup: float = 1.0  # per-layer latency = launch's / this (rewritten kernels)
    async_io: bool = False  # hop = hop_wire_s + activation bytes / I/O, not the launch's fitted hop
    hop_wire_s: float = 0.0  # fixed latency of one hop when async_io (switch and serdes)
    max_draft_tokens: int = 0  # > 0: speculative decoding, draft length searched in 1..this
    sources: tuple[str, ...] = ()

    @property
    def speculative(self) -> bool:
        return self.max_draft_tokens > 0


CS3_LAUNCH = Generation(
    "2024-08", "launch",
    sources=("Cerebras inference launch blog, Aug 27 2024 [B]: one forward pass per token, native 16-bit weights",))

CS3_SPECULATIVE = Generation(
    "2024-10", "speculative",
    # fitted: bench/calibration.py fit_latency_speedup(), to Llama 3.1 70B on 4 systems at 2,100 tok/s/user
    latency_speedup=1.996,
    async_io=True,
    # assumption: one cut-through Ethernet switch plus serdes, about 2 us (the 12 x 100 GbE of s2)
    hop_wire_s=2e-6,
    # assumption: the draft length the operator would pick is searched up to 16 (published tutorials use 4-7)
    max_draft_tokens=16,
    sources=(OCT_2024_RELEASE, "latency_speedup: fitted to Llama 3.1 70B, 4 systems, 2,100 tok/s/user (Oct 2024)",
             "hop_wire_s 2 us, max_draft_tokens 16: assumptions"))

# family -> its generations, oldest first; the last is what the bare family name selects
GENERATIONS: dict[str, tuple[Generation, ...]] = {"cs3": (CS3_LAUNCH, CS3_SPECULATIVE)}


def profile_name(family: str, gen: Generation) -> str:
    return f"{family}@{gen.name}"


def generation_names(family: str) -> tuple[str, ...]:
    """Every explicit profile name of a family, oldest first ("cs3@2024-08", ...)."""
    return tuple(profile_name(family, g) for g in GENERATIONS[family])


def newest(family: str) -> str:
    """The profile name the bare family name stands for."""
    return profile_name(family, GENERATIONS[family][-1])
