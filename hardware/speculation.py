"""Speculative decoding: the acceptance-rate assumption, expected tokens per step, draft candidates.

Acceptance rate as a function of the (draft, target) pair. What is published for Cerebras is only that
"a small model and large model" run in tandem; the draft, its length and the acceptance are not. The
assumption: the per-token acceptance rate falls linearly in log10(draft params / target params), with
the line fitted (least squares) to the one published sweep of draft sizes for one target, Leviathan et
al. 2023 ("Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192, Table 3:
LaMDA 137B with 100M / 2B / 8B drafts, greedy: 0.61 / 0.71 / 0.75). Why this form: the same table
shows acceptance rising with draft size with diminishing returns, and the size ratio is the one
property every (draft, target) pair in model/specs.py has; why this data: it is the only sweep over
draft sizes at a fixed target we found, and no figure in the calibration table is used to set it.
Limits: chat text at temperature 0; MoE targets are compared by total parameters; task and sampling
temperature move real acceptance by +-0.1 (not modelled), except for the one task named below.

Domain: the sweep's drafts were trained on the target's own data, so the line says nothing about a pair
tuned on different data. A target fine-tuned on data other than its family's (`ModelSpec.tuned_on`: the
DeepSeek-R1 distills on R1's outputs, Perplexity's Sonar on its search answers) gets drafts tuned on the
same data only; no registered model is, so it decodes without a draft. (Found looking at R1 Distill Llama
70B's +40% miss against Cerebras's 1,500 tok/s/user, bench/calibration.py: its Llama 3.3 base is published
at 2,100-2,314 on the same systems with a draft. Sonar's 1,200 was found after the rule, and checks it.)

Copy tasks: LLMPerf's token benchmark (the AWS Neuron tutorials' figures) asks the model to "randomly
stream lines" of a sonnet given in the prompt, so the output is text already in the context, which a
same-family draft reproduces as the target does. The assumption is the upper bound, every draft token
accepted (COPY_TASK_ACCEPTANCE); it is not fitted to any figure (the Neuron rows are then checked with it,
bench/calibration.py).
"""
from __future__ import annotations

import math

import numpy as np

from model.specs import SPECS, ModelSpec

# (draft params, target params, acceptance) from Leviathan et al. 2023, Table 3 (LaMDA, temperature 0)
LEVIATHAN_LAMDA = ((100e6, 137e9, 0.61), (2e9, 137e9, 0.71), (8e9, 137e9, 0.75))
COPY_TASK_ACCEPTANCE = 1.0  # assumption: the output copies the prompt's text (module docstring)
_SLOPE, _INTERCEPT = np.polyfit([math.log10(d / t) for d, t, _ in LEVIATHAN_LAMDA],
                                [a for _, _, a in LEVIATHAN_LAMDA], 1)


def acceptance_rate(draft: ModelSpec, target: ModelSpec) -> float:
    """Assumed probability that the target accepts one draft token (module docstring)."""
    ratio = draft.params_total() / target.params_total()
    return float(min(1.0, max(0.0, _INTERCEPT + _SLOPE * math.log10(ratio))))


def expected_tokens(acceptance: float, draft_tokens: int) -> float:
    """Tokens emitted per verification step: accepted drafts plus the target's own token."""
    a, k = acceptance, draft_tokens
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def draft_candidates(target: ModelSpec) -> tuple[ModelSpec, ...]:
    """Registered models that can draft for `target`: smaller, with the same tokenizer (equal vocabulary
    size stands in for it; true of every pair in model/specs.py) and tuned on the same data (module
    docstring: Domain), smallest first."""
    same = [s for s in SPECS.values() if s.vocab_size == target.vocab_size and s.tuned_on == target.tuned_on
            and s.params_total() < target.params_total()]
    return tuple(sorted(same, key=lambda s: s.params_total()))
