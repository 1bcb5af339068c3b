"""Decode throughput: this core vs Hugging Face transformers (fp32, torch CPU) vs measured rooflines.

`python -m bench.decode [--threads N] [--batches 1 8 32 64] [--prompt 128] [--gen 128]`
SmolLM2-135M, a 128-token prompt per sequence, 128 generated tokens (the first comes from the
prefill, as in the disaggregated handoff, so both engines time 127 batched decode steps). Writes
bench/results/decode.json: a list of rows {engine, batch, tokens_per_s, ms_per_step, blas_threads,
blas_core} (blas_core: the OpenBLAS kernels numpy ran, which OPENBLAS_CORETYPE can force).
The machine is shared: compare rows of one run, never across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from decode import blas
from decode.core import DecodeCore, model_layout
from decode.pool import PagedKVPool
from decode.scheduler import DecodeSeq, Scheduler
from model.loaded import LoadedModel, load_model
from bench import RESULTS

OUT = RESULTS / "decode.json"
CORE, HF = "numpy-paged-core", "hf-transformers-fp32-torch-cpu"


def measure_rooflines(threads: int) -> tuple[float, float]:
    """(sgemm FLOP/s, streaming read bytes/s): the best of a few tries with `threads` BLAS threads."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    flops = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        flops = max(flops, 2 * 2048 ** 3 / (time.perf_counter() - t))
    big = np.ones((256 * 2 ** 20 // 4) * 2, dtype=np.float32)  # 512 MB, far beyond the caches
    parts = np.array_split(big, threads)
    x = np.ones(2048, dtype=np.float32)
    mat = big.reshape(-1, 2048)  # (65536, 2048): sgemv streams it once
    bw = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(4):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))  # reductions release the GIL: one stream per thread
            bw = max(bw, big.nbytes / (time.perf_counter() - t))
            t = time.perf_counter()
            mat @ x
            bw = max(bw, big.nbytes / (time.perf_counter() - t))
    return flops, bw


def bench_core(lm: LoadedModel, prompt: list[int], batch: int, gen: int, block_size: int = 64,
               threads: int = 2) -> float:
    """Seconds for gen - 1 decode steps of `batch` sequences through scheduler + core."""
    model = lm.model
    logits, ks, vs = model.prefill(prompt)
    first = int(np.argmax(logits))
    per_seq = len(prompt) + gen + block_size
    pool = PagedKVPool(model_layout(model), block_size, capacity_tokens=batch * per_seq)
    sched, core = Scheduler(pool.allocator, max_batch=batch), DecodeCore(model, pool, threads=threads)
    for i in range(batch):
        pool.load_sequence(f"b{i}", ks, vs)
        sched.add(DecodeSeq(f"b{i}", pool.claim(f"b{i}"), [first], gen))
    steps, t0 = 0, time.perf_counter()
    with tqdm(total=gen - 1, desc=f"core      batch {batch:3d}", unit="step", leave=False) as bar:
        while sched.has_work:
            plan = sched.schedule()
            b = core.batch_input([s.request_id for s in plan.batch], [s.next_token for s in plan.batch],
                                 [s.context_len for s in plan.batch])
            sched.on_step_done(np.argmax(core.forward(b), axis=1))
            steps += 1
            bar.update()
    assert steps == gen - 1 and pool.allocator.free_blocks == pool.allocator.n_blocks
    return time.perf_counter() - t0


def hf_model(lm: LoadedModel):
    """transformers' LlamaForCausalLM with the same fp32 weights (checked against our prefill)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    c, w = lm.weights.config, lm.weights
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                      num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                      head_dim=c.head_dim, rope_theta=c.rope_base, rms_norm_eps=c.rms_eps,
                      max_position_embeddings=c.context_length, tie_word_embeddings=True,
                      bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, torch_dtype="float32")
    hf = LlamaForCausalLM(cfg).eval()
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))  # noqa: E731
    q_end, k_end = c.n_heads * c.head_dim, (c.n_heads + c.n_kv_heads) * c.head_dim
    sd = {"model.embed_tokens.weight": t(w.token_embedding), "model.norm.weight": t(w.final_norm),
          "lm_head.weight": t(w.token_embedding)}
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": t(lw.attn_norm), p + "post_attention_layernorm.weight": t(lw.ffn_norm),
               p + "self_attn.q_proj.weight": t(lw.wqkv[:, :q_end].T), p + "self_attn.k_proj.weight":
               t(lw.wqkv[:, q_end:k_end].T), p + "self_attn.v_proj.weight": t(lw.wqkv[:, k_end:].T),
               p + "self_attn.o_proj.weight": t(lw.wo.T), p + "mlp.gate_proj.weight": t(lw.w_gate_up[:, :c.d_ff].T),
               p + "mlp.up_proj.weight": t(lw.w_gate_up[:, c.d_ff:].T), p + "mlp.down_proj.weight": t(lw.w_down.T)}
    hf.load_state_dict(sd, strict=False)
    ids = list(range(100, 140))
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0, -1].numpy()
    ours = lm.model.prefill(ids)[0]
    assert np.abs(theirs - ours).max() < 1e-3 * np.abs(ours).max(), "HF model does not match the numpy model"
    return hf


def bench_hf(hf, prompt: list[int], batch: int, gen: int) -> float:
    """Seconds for gen - 1 decode steps with transformers' KV cache (prefill not timed)."""
    import torch
    with torch.inference_mode():
        ids = torch.tensor([prompt] * batch)
        out = hf(ids, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        t0 = time.perf_counter()
        for _ in tqdm(range(gen - 1), desc=f"hf        batch {batch:3d}", unit="step", leave=False):
            out = hf(nxt, past_key_values=pkv, use_cache=True)
            pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="BLAS / torch threads")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=64, help="KV pool block size (tokens)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    threadpool_limits(limits=args.threads)
    lm = load_model()
    prompt = list(np.random.default_rng(0).integers(3, lm.weights.config.vocab_size, size=args.prompt))
    load0 = os.getloadavg()[0]
    flops, bw = measure_rooflines(args.threads)
    weight_bytes, params = lm.weights.weight_bytes, lm.weights.weight_bytes / 4
    rows = []

    def row(engine, batch, seconds_per_step):
        rows.append({"engine": engine, "batch": batch, "tokens_per_s": round(batch / seconds_per_step, 1),
                     "ms_per_step": round(seconds_per_step * 1e3, 2), "blas_threads": args.threads,
                     "blas_core": blas.openblas_core()})

    hf = None
    if not args.no_hf:
        import torch
        torch.set_num_threads(args.threads)
        hf = hf_model(lm)
    for batch in args.batches:
        row(CORE, batch, bench_core(lm, prompt, batch, args.gen, args.block_size, args.threads) / (args.gen - 1))
        if hf is not None:
            row(HF, batch, bench_hf(hf, prompt, batch, args.gen) / (args.gen - 1))
        row("roofline-bandwidth", batch, weight_bytes / bw)
        row("roofline-compute", batch, 2 * params * batch / flops)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows, args, flops, bw, load0)
    print(f"plotted {plot(sorted(args.out.parent.glob('decode*.json')), args.out.parent / 'plots' / 'decode.png')}")
    return rows


def plot(results: list[Path], path: Path) -> Path:
    """Tokens/s against batch for every run in `results` (decode.json rows): this core and transformers
    as lines, the attainable roofline (the slower of the two) dotted; each run labelled by its
    OpenBLAS core. Runs at other lengths (--prompt, --gen) show up as they are: label them apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, result in enumerate(results):
        rows = json.loads(result.read_text())
        core = ",".join(sorted({r["blas_core"] for r in rows})) or "?"
        by = {(r["engine"], r["batch"]): r for r in rows}
        batches = sorted({r["batch"] for r in rows})
        colour = plt.get_cmap("tab10")(i)
        for engine, style, label in ((CORE, "-o", f"this core, OpenBLAS {core}"),
                                     (HF, "--s", f"transformers fp32 (torch), run with {core}")):
            points = [(b, by[engine, b]["tokens_per_s"]) for b in batches if (engine, b) in by]
            if points:
                ax.plot(*zip(*points), style, c=colour, label=label)
        roof = [(b, min(by["roofline-bandwidth", b]["tokens_per_s"], by["roofline-compute", b]["tokens_per_s"]))
                for b in batches if ("roofline-compute", b) in by]
        ax.plot(*zip(*roof), ":", c=colour, label=f"roofline, {core}")
    ax.set(xscale="log", yscale="log", xlabel="batch (sequences stepped together)", ylabel="tokens/s",
           title="SmolLM2-135M fp32 decode on 2 cores")
    ax.set_xticks([1, 2, 4, 8, 16, 32, 64], labels=["1", "2", "4", "8", "16", "32", "64"])
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def print_table(rows: list[dict], args, flops: float, bw: float, load0: float) -> None:
    print(f"\nSmolLM2-135M decode, {args.prompt}-token prompts, {args.gen} generated tokens, "
          f"{args.threads} BLAS/torch threads (OpenBLAS core {blas.openblas_core() or 'n/a'}); "
          f"sgemm {flops / 1e9:.0f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (shared machine: noisy)")
    by = {(r["engine"], r["batch"]): r for r in rows}
    print(f"{'engine':34s} {'batch':>5s} {'tok/s':>9s} {'ms/step':>9s} {'vs hf':>7s} {'% roofline':>11s}")
    for r in rows:
        batch, engine = r["batch"], r["engine"]
        hf = by.get((HF, batch))
        bound = max(by[("roofline-bandwidth", batch)]["ms_per_step"], by[("roofline-compute", batch)]["ms_per_step"])
        real = not engine.startswith("roofline")
        vs = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if hf and real else "-"
        pct = f"{100 * bound / r['ms_per_step']:.0f}%" if real else "-"
        print(f"{engine:34s} {batch:5d} {r['tokens_per_s']:9.1f} {r['ms_per_step']:9.2f} {vs:>7s} {pct:>11s}")
    core = {b: r for (e, b), r in by.items() if e == CORE}
    if 64 in core:
        c = core[64]
        comp = by[("roofline-compute", 64)]["ms_per_step"] / c["ms_per_step"]
        hf = by.get((HF, 64))
        print(f"batch 64: {comp:.0%} of the compute roofline (target 50%)"
              + (f", {c['tokens_per_s'] / hf['tokens_per_s']:.2f}x transformers (target 2.0x)" if hf else ""))
    if 1 in core:
        band = by[("roofline-bandwidth", 1)]["ms_per_step"] / core[1]["ms_per_step"]
        print(f"batch 1: {band:.0%} of the bandwidth roofline (target 70%)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
