"""Decode benchmark: our engine vs a naive eager-torch baseline vs llama.cpp, in one run.

    python bench/decode.py                         # embedded SmolLM2-135M Q4_1, 64-token prompt
    python bench/decode.py --prompt-tokens 256 --new-tokens 128 --threads 2 --json out.json
    python bench/decode.py --batch                 # several sessions: batched decoding, KV slots
                                                   # (bench/decode_batch.py; its own --help)

For each peer it measures, on the same GGUF, the same prompt token ids and the same thread count:
prefill tokens/s, time to first token (request start -> first token sampled) and decode tokens/s
(greedy; end-of-turn tokens are ignored so every peer decodes exactly --new-tokens). Each peer runs
--repeat times, interleaved so background load hits all alike; the best run is reported, and
ratios are taken against peers measured in this same run (absolute figures on a shared 2-core box
are noisy, ratios much less so).

Peers:
  ours       Engine with its default backend: on CPU the native C decode step over the GGUF's own
             Q4/Q8 blocks (kernels/cpu_decode.c); on CUDA the Triton kernels in a CUDA graph
  eager      Engine(backend="eager"): dequantised weights, plain torch modules (the naive baseline)
  llama_cpp  llama.cpp through llama-cpp-python on the same GGUF, same threads (pip-installed into
             this environment on first use if missing; the product never depends on it)

GPU: `--device cuda` runs ours and eager on the GPU (llama.cpp, a CPU build here, is skipped
there). It also prints the memory-bandwidth roofline: decode
at batch 1 must read every weight once per token, so tok/s <= measured copy bandwidth / bytes per
token; ours is reported as a fraction of that bound (target >= 70 %). `--model llama-3.2-1b-random`
benchmarks a randomly initialised Llama-3.2-1B-shaped model in bf16 (no weights needed; the
embedded tokenizer only makes the prompt ids, which fit its vocabulary).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rejoinder.engine import Engine, EngineOptions, SamplingParams

FILLER = (
    "The quick brown fox jumps over the lazy dog while the voice agent listens, thinks and answers "
    "within a fraction of a second. Latency matters more than anything else in a conversation. "
)


@dataclass
class Result:
    prefill_tok_s: float
    ttft_s: float
    decode_tok_s: float
    prompt_tokens: int
    new_tokens: int
    load_s: float = 0.0  # model load, including compilation for ours

    def better(self, other: Result | None) -> Result:
        return self if other is None or self.decode_tok_s > other.decode_tok_s else other


def prompt_ids(engine: Engine, n: int) -> list[int]:
    """A chat prompt of exactly n tokens (the user text is cut to fit)."""
    text_ids = engine.tokenizer.encode(FILLER * (n // 20 + 2))
    head = engine.chat_ids([{"role": "user", "content": ""}])
    body = text_ids[: max(0, n - len(head))]
    return (body + head)[:n] if len(head) < n else head[:n]


# --- peers -------------------------------------------------------------------------------------


RANDOM_1B = "llama-3.2-1b-random"


def random_llama_1b(options: EngineOptions) -> Engine:
    """Llama-3.2-1B's shapes with random weights (bf16 on CUDA), driven by the embedded tokenizer."""
    from rejoinder.engine.config import ModelConfig, RopeScaling
    from rejoinder.engine.engine import build_model
    from rejoinder.engine.gguf_loader import read_metadata
    from rejoinder.engine.model import Transformer
    from rejoinder.engine.tokenizer import tokenizer_from_gguf
    from rejoinder.streaming.assets import resolve

    cfg = ModelConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, head_dim=64,
        rope_theta=500000.0, norm_eps=1e-5, max_position=131072, tie_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
    )
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=g) * 0.02 if len(s) > 1 else torch.ones(s) for n, s in shapes.items()}
    model = build_model(cfg, state, options)
    tokenizer = tokenizer_from_gguf(read_metadata(resolve("llm"))[1])
    return Engine(model, tokenizer, options)


class EnginePeer:
    def __init__(self, path: Path | str, options: EngineOptions):
        t0 = time.monotonic()
        self.engine = random_llama_1b(options) if str(path) == RANDOM_1B else Engine.load(path, options)
        self.load_s = time.monotonic() - t0
        self.engine.tokenizer.stop_ids = set()  # decode exactly new_tokens, never stop early

    def run(self, ids: list[int], new_tokens: int) -> Result:
        eng = self.engine
        eng.reset()
        for _ in eng.generate(ids, SamplingParams(max_new_tokens=new_tokens)):
            pass
        s = eng.last_stats
        return Result(s.prefill_tok_s, s.ttft_s, s.decode_tok_s, len(ids), s.new_tokens, self.load_s)


class LlamaCppPeer:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        llama_cpp = ensure_llama_cpp()
        t0 = time.monotonic()
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
            verbose=False,
        )
        self.load_s = time.monotonic() - t0
        self._get_logits = llama_cpp.llama_get_logits_ith
        self._n_vocab = self.llm.n_vocab()

    def _next(self) -> int:
        import numpy as np

        # the last position's logits straight from the context (Llama.scores is only filled with
        # logits_all=True, which would make llama.cpp copy logits for every prompt position)
        logits = np.ctypeslib.as_array(self._get_logits(self.llm.ctx, -1), shape=(self._n_vocab,))
        return int(np.argmax(logits))

    def run(self, ids: list[int], new_tokens: int) -> Result:
        llm = self.llm
        llm.reset()
        t0 = time.monotonic()
        llm.eval(ids)
        token = self._next()
        t_first = time.monotonic()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = self._next()
        t_end = time.monotonic()
        prefill_s = t_first - t0  # includes one argmax, as ours does
        decode = (new_tokens - 1) / (t_end - t_first) if new_tokens > 1 else 0.0
        return Result(len(ids) / prefill_s, prefill_s, decode, len(ids), new_tokens, self.load_s)


def ensure_llama_cpp():
    """Import llama_cpp, pip-installing llama-cpp-python into this environment if it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    print("llama-cpp-python is not installed; building it from source into this environment "
          "(cmake, several minutes on 2 cores) ...", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "llama-cpp-python"])
    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Achievable device memory bandwidth in bytes/s: a large device-to-device copy reads and
    writes every byte, so 2 * nbytes move per copy (best of 10)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bytes_per_token(engine: Engine, context: int) -> int:
    """What one decode step must read at least: every weight once (in the form the step reads it,
    tied embeddings once as the output head) plus the KV cache rows it attends over."""
    decoder = engine.decoder
    weights = getattr(decoder, "weight_bytes", None)
    if weights is None:
        seen, weights = set(), 0
        for name, p in engine.model.named_parameters():
            if p.ndim == 2 and id(p) not in seen and not name.startswith("embed"):
                seen.add(id(p))
                weights += p.numel() * p.element_size()
    cfg = engine.model.cfg
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * engine.model.output.weight.element_size()
    return int(weights + kv)


def gpu_roofline(engine: Engine, ours_tok_s: float, context: int, device: str) -> dict | None:
    """Decode tok/s bound = bandwidth / bytes per token, and our fraction of it (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    bw = copy_bandwidth(device)
    per_token = bytes_per_token(engine, context)
    bound = bw / per_token
    return {
        "gpu": torch.cuda.get_device_name(device),
        "copy_bandwidth_gb_s": bw / 1e9,
        "bytes_per_token": per_token,
        "roofline_tok_s": bound,
        "ours_tok_s": ours_tok_s,
        "fraction": ours_tok_s / bound,
    }


# --- reporting ---------------------------------------------------------------------------------


def plot(results: dict[str, Result], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    metrics = [("decode_tok_s", "decode tokens/s"), ("prefill_tok_s", "prefill tokens/s"),
               ("ttft_s", "time to first token (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, metrics):
        values = [getattr(results[n], key) for n in names]
        bars = ax.bar(names, values, color=["#2a7", "#999", "#37c"][: len(names)])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


SWEEP = (2, 4, 8, 16, 32, 64, 128, 256)
SWEEP_PREFIX = 32


def prefill_sweep(ours: Engine, llama: LlamaCppPeer | None, ids: list[int], repeat: int) -> list[dict]:
    """Time prefilling n new tokens after a cached SWEEP_PREFIX-token prefix (a conversation turn):
    the native prefill, the eager fp32 model and llama.cpp, for each n in SWEEP (best of `repeat`)."""
    prefix, rows = ids[:SWEEP_PREFIX], []
    native = getattr(ours.decoder, "prefill", None) if ours.backend == "native" else None
    for n in SWEEP:
        new = (ids[SWEEP_PREFIX:] * (n // max(1, len(ids) - SWEEP_PREFIX) + 1))[:n]
        times: dict[str, float] = {}

        def timed(name: str, setup, run) -> None:
            for _ in range(repeat):
                setup()
                t0 = time.perf_counter()
                run()
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)

        def eager_prefix() -> None:
            ours.reset()
            ours.prefill(prefix)

        with torch.inference_mode():
            timed("eager", eager_prefix,
                  lambda: ours.model(torch.tensor([new]), SWEEP_PREFIX, last_only=True))
            if native is not None:
                timed("native", eager_prefix, lambda: native(new, SWEEP_PREFIX))
        if llama is not None:
            timed("llama_cpp", lambda: (llama.llm.reset(), llama.llm.eval(prefix)), lambda: llama.llm.eval(new))
        rows.append({"new_tokens": n, **{f"{k}_ms": v * 1e3 for k, v in times.items()}})
        print(f"  prefill {n:4d} new tokens: " + "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in times.items())
              + (f"  eager/native {times['eager'] / times['native']:.2f}x" if "native" in times else ""), flush=True)
    ours.reset()
    return rows


def main(argv: list[str] | None = None) -> dict:
    if "--batch" in (sys.argv[1:] if argv is None else argv):
        from decode_batch import main as batch_main

        return batch_main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", action="store_true",
                    help="concurrent sessions instead: batched vs serialised decoding, follow-up prefill with "
                         "per-session KV slots (bench/decode_batch.py --help)")
    ap.add_argument("--model", default=None,
                    help=f"GGUF file or safetensors folder (default: the embedded SmolLM2-135M Q4_1), or {RANDOM_1B}")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every peer")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=Path(__file__).parent / "results" / "decode.png")
    ap.add_argument("--prefill-sweep", action="store_true",
                    help=f"also time prefills of {', '.join(map(str, SWEEP))} new tokens after a cached prefix")
    args = ap.parse_args(argv)

    if args.model is None:
        from rejoinder.streaming.assets import resolve

        args.model = resolve("llm")
    elif args.model != RANDOM_1B:
        args.model = Path(args.model)
    if args.model == RANDOM_1B or not str(args.model).endswith(".gguf") or args.device != "cpu":
        args.skip_llama_cpp = True  # llama.cpp needs a GGUF file
    torch.set_num_threads(args.threads)
    n_ctx = max(args.prompt_tokens + args.new_tokens, SWEEP_PREFIX + max(SWEEP) if args.prefill_sweep else 0) + 16
    opts = dict(max_seq_len=max(n_ctx, 512), device=args.device, threads=args.threads)

    model_name = args.model if args.model == RANDOM_1B else args.model.name
    print(f"model {model_name}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, device {args.device}", flush=True)
    peers: dict[str, object] = {}
    peers["ours"] = EnginePeer(args.model, EngineOptions(**opts))
    print(f"  ours loaded in {peers['ours'].load_s:.1f} s, decode steps: {peers['ours'].engine.backend}", flush=True)
    peers["eager"] = EnginePeer(args.model, EngineOptions(**opts, backend="eager"))
    if not args.skip_llama_cpp:
        peers["llama_cpp"] = LlamaCppPeer(args.model, args.threads, n_ctx)
    ids = prompt_ids(peers["ours"].engine, args.prompt_tokens)

    for peer in peers.values():  # warm-up: first-touch page faults, caches, lazy init
        peer.run(ids[:8], 4)
    best: dict[str, Result | None] = dict.fromkeys(peers)
    for r in range(args.repeat):
        for name, peer in peers.items():
            best[name] = peer.run(ids, args.new_tokens).better(best[name])
            print(f"  run {r + 1}/{args.repeat} {name:10s} decode {best[name].decode_tok_s:7.1f} tok/s (best so far)",
                  flush=True)
    results: dict[str, Result] = {k: v for k, v in best.items() if v is not None}

    print(f"\n{'peer':10s} {'prefill tok/s':>14s} {'TTFT ms':>9s} {'decode tok/s':>13s}")
    for name, res in results.items():
        print(f"{name:10s} {res.prefill_tok_s:14.1f} {res.ttft_s * 1e3:9.1f} {res.decode_tok_s:13.1f}")
    ratios = {"decode_ours_over_eager": results["ours"].decode_tok_s / results["eager"].decode_tok_s}
    if "llama_cpp" in results:
        ratios["decode_ours_over_llama_cpp"] = results["ours"].decode_tok_s / results["llama_cpp"].decode_tok_s
        ratios["prefill_ours_over_llama_cpp"] = results["ours"].prefill_tok_s / results["llama_cpp"].prefill_tok_s
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}x")

    report = {name: asdict(res) for name, res in results.items()}
    report.update(
        device=args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores)",
        threads=args.threads,
        model=model_name,
        backend=peers["ours"].engine.backend,
        ratios=ratios,
        roofline=gpu_roofline(peers["ours"].engine, results["ours"].decode_tok_s,
                              args.prompt_tokens + args.new_tokens // 2, args.device),
    )
    if report["roofline"]:
        r = report["roofline"]
        print(f"roofline: {r['copy_bandwidth_gb_s']:.0f} GB/s / {r['bytes_per_token'] / 1e6:.1f} MB per token = "
              f"{r['roofline_tok_s']:.0f} tok/s; ours {r['ours_tok_s']:.0f} tok/s = {100 * r['fraction']:.0f}% of it")
    if args.prefill_sweep:
        print("prefill sweep (after a cached 32-token prefix):", flush=True)
        report["prefill_sweep"] = prefill_sweep(peers["ours"].engine, peers.get("llama_cpp"),
                                                prompt_ids(peers["ours"].engine, 300), args.repeat)
    title = f"{model_name}: prompt {args.prompt_tokens}, {args.threads} threads, {report['device']}"
    plot(results, title, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"json: {args.json}")
    return report


if __name__ == "__main__":
    main()
