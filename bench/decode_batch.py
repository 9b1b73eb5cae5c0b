"""Several sessions on one engine: batched decoding and per-session KV-cache slots, in one run.

    python bench/decode.py --batch                       # embedded SmolLM2-135M Q4_1, 1/2/4 sessions
    python bench/decode.py --batch --concurrency 1,2,4,8 --new-tokens 64 --threads 2 --skip-llama-cpp

Part 1, aggregate decode tokens/s of N concurrent generations (N = --concurrency), greedy, end of
turn ignored so each decodes exactly --new-tokens, each in its own cache slot with its prompt
already cached (prefill is part 2's subject, not this one's):
  batched     the N generations submitted together: the engine thread steps them as one batch,
              each weight block unpacked once for all N (rj_decode_batch on CPU)
  serialised  the same N generations one after another on the same engine (what one generation
              at a time gives N sessions: the engine before batching)
  llama_cpp   llama.cpp (llama-cpp-python, one context, same GGUF and threads), the N generations
              one after another, timed at its decode rate (its prompt prefill left out, as ours is
              cached); pip-installed on first use as in decode.py, --skip-llama-cpp to leave it out
Aggregate = N * new tokens / wall time, best of --repeat (interleaved, so load hits all alike).

Part 2, follow-up prefill with two interleaved sessions: conversations A and B alternate turns
(A1 B1 A2 B2 ...). With slots each session keeps its own cache slot, so a follow-up prefills only
its new tokens; the baseline is the single shared cache (every turn in the default slot), where
each turn finds the other session's tokens there and prefills its whole history again. Reported:
prefill tokens and milliseconds per follow-up (turns after the first), and their ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path

import torch
from decode import FILLER, LlamaCppPeer

from rejoinder.engine import Engine, EngineOptions, SamplingParams

RESULTS = Path(__file__).parent / "results"

CONVERSATIONS = {
    "A": ["Give me one tip for sleeping better.", "Another one, please.", "And one for waking up?",
          "Which of those matters most?", "Thanks. Anything about coffee?"],
    "B": ["My internet is down again.", "I already restarted the router.", "The lights are all green.",
          "It works on my phone though.", "Fine, how do I reset the laptop's network?"],
}


def prompts(engine: Engine, n: int, length: int) -> list[list[int]]:
    """n different chat prompts of exactly `length` tokens."""
    words = FILLER.split()
    out = []
    for i in range(n):
        text = " ".join(words[i * 7:] + words[: i * 7]) * (length // 20 + 2)
        head = engine.chat_ids([{"role": "user", "content": ""}])
        out.append((engine.tokenizer.encode(text)[: max(0, length - len(head))] + head)[-length:])
    return out


async def _together(engine: Engine, ids: list[list[int]], keys: list[str], new_tokens: int) -> float:
    """Wall seconds for the generations started together (queued while the engine thread is held)."""
    entered, go = threading.Event(), threading.Event()
    gate = asyncio.ensure_future(engine.run_async(lambda: (entered.set(), go.wait(60)), slot="bench-gate"))
    while not entered.is_set():
        await asyncio.sleep(0.0005)
    streams = [engine.stream(p, SamplingParams(max_new_tokens=new_tokens), slot=k) for p, k in zip(ids, keys)]
    t0 = time.perf_counter()
    go.set()
    counts = await asyncio.gather(*(_count(s) for s in streams))
    wall = time.perf_counter() - t0
    await gate
    assert counts == [new_tokens] * len(ids), counts
    return wall


async def _count(stream) -> int:
    return sum([1 async for _ in stream])


def serialised(engine: Engine, ids: list[list[int]], keys: list[str], new_tokens: int) -> float:
    t0 = time.perf_counter()
    for p, k in zip(ids, keys):
        n = sum(1 for _ in engine.generate(p, SamplingParams(max_new_tokens=new_tokens), slot=k))
        assert n == new_tokens
    return time.perf_counter() - t0


def decode_part(engine: Engine, llama: LlamaCppPeer | None, args: argparse.Namespace) -> list[dict]:
    stops, engine.tokenizer.stop_ids = engine.tokenizer.stop_ids, set()  # decode exactly new_tokens
    try:
        top = max(args.concurrency)
        ids = prompts(engine, top, args.prompt_tokens)
        keys = [f"bench-{i}" for i in range(top)]
        for p, k in zip(ids, keys):  # every session's prompt cached in its slot
            engine.prefill(p, slot=k)
        asyncio.run(_together(engine, ids[:2], keys[:2], 4))  # warm-up
        best: dict[tuple[str, int], float] = {}
        for r in range(args.repeat):
            for n in args.concurrency:
                runs = {
                    "batched": lambda: asyncio.run(_together(engine, ids[:n], keys[:n], args.new_tokens)),
                    "serialised": lambda: serialised(engine, ids[:n], keys[:n], args.new_tokens),
                }
                if llama is not None:  # its decode rate (its own prompt prefill left out, as ours is cached)
                    runs["llama_cpp"] = lambda: sum(args.new_tokens / llama.run(p, args.new_tokens).decode_tok_s
                                                    for p in ids[:n])
                for name, run in runs.items():
                    tok_s = n * args.new_tokens / run()
                    best[name, n] = max(best.get((name, n), 0.0), tok_s)
                print(f"  run {r + 1}/{args.repeat} N={n}: " + "  ".join(
                    f"{name} {best[name, n]:7.1f}" for name in runs) + " tok/s (best so far)", flush=True)
        rows = []
        for n in args.concurrency:
            row = {"concurrency": n, **{f"{name}_tok_s": v for (name, m), v in best.items() if m == n}}
            row["batched_over_serialised"] = row["batched_tok_s"] / row["serialised_tok_s"]
            if "llama_cpp_tok_s" in row:
                row["batched_over_llama_cpp"] = row["batched_tok_s"] / row["llama_cpp_tok_s"]
            rows.append(row)
        for k in keys:
            engine.release_slot(k)
        return rows
    finally:
        engine.tokenizer.stop_ids = stops


def followup_part(engine: Engine, turns: int, new_tokens: int) -> dict:
    """Two conversations alternating turns, with per-session slots and with the one shared cache."""
    out: dict[str, list[dict]] = {}
    for mode in ("slots", "single_cache"):
        engine.reset()
        history = {k: [] for k in CONVERSATIONS}
        rows = []
        for t in range(turns):
            for key, lines in CONVERSATIONS.items():
                history[key].append({"role": "user", "content": lines[t % len(lines)]})
                ids = engine.chat_ids(history[key])
                params = SamplingParams(max_new_tokens=new_tokens)
                answer = [ev.token_id for ev in engine.generate(ids, params, slot=key if mode == "slots" else None)]
                s = engine.last_stats
                rows.append({"turn": t + 1, "session": key, "prompt_tokens": len(ids),
                             "prefill_tokens": s.prefill_tokens, "prefill_ms": s.prefill_s * 1e3})
                history[key].append({"role": "assistant", "content": engine.tokenizer.decode(answer).strip()})
        out[mode] = rows
        for key in CONVERSATIONS:
            engine.release_slot(key)

    def mean(mode: str, field: str) -> float:
        vals = [r[field] for r in out[mode] if r["turn"] > 1]
        return sum(vals) / len(vals)

    summary = {f"{m}_{f}_per_followup": mean(m, f) for m in out for f in ("prefill_tokens", "prefill_ms")}
    summary["prefill_tokens_single_over_slots"] = (summary["single_cache_prefill_tokens_per_followup"]
                                                   / summary["slots_prefill_tokens_per_followup"])
    summary["prefill_ms_single_over_slots"] = (summary["single_cache_prefill_ms_per_followup"]
                                               / summary["slots_prefill_ms_per_followup"])
    return {"turns": out, "summary": summary}


def plot(rows: list[dict], follow: dict, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    peers = [p for p in ("batched", "serialised", "llama_cpp") if f"{p}_tok_s" in rows[0]]
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        xs = [j + i * width for j in range(len(rows))]
        bars = ax1.bar(xs, [r[f"{peer}_tok_s"] for r in rows], width, label=peer,
                       color={"batched": "#2a7", "serialised": "#999", "llama_cpp": "#37c"}[peer])
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ax1.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(rows))],
                   [f"{r['concurrency']} session{'s' if r['concurrency'] > 1 else ''}" for r in rows])
    ax1.set_ylabel("aggregate decode tokens/s")
    ax1.set_title("concurrent generations")
    ax1.legend()
    for mode, color in (("slots", "#2a7"), ("single_cache", "#999")):
        turns = follow["turns"][mode]
        ax2.plot(range(len(turns)), [r["prefill_tokens"] for r in turns], "o-", color=color,
                 label={"slots": "a KV slot per session", "single_cache": "one shared cache"}[mode])
    ax2.set_xticks(range(len(turns)), [f"{r['session']}{r['turn']}" for r in turns])
    ax2.set_xlabel("turn")
    ax2.set_ylabel("prefill tokens")
    ax2.set_title("two interleaved conversations: tokens prefilled per turn")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", action="store_true", help="(how decode.py hands over to this script)")
    ap.add_argument("--model", default=None, help="GGUF file or safetensors folder (default: the embedded model)")
    ap.add_argument("--concurrency", default="1,2,4", help="comma-separated session counts")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation in the follow-up part")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS / "decode_batch.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "decode_batch.png")
    args = ap.parse_args(argv)
    args.concurrency = sorted({int(x) for x in args.concurrency.split(",")})
    if args.model is None:
        from rejoinder.streaming.assets import resolve

        args.model = resolve("llm")
    args.model = Path(args.model)
    torch.set_num_threads(args.threads)
    top = max(args.concurrency)
    ctx = max(args.prompt_tokens + args.new_tokens + 16, 1024)
    engine = Engine.load(args.model, EngineOptions(max_seq_len=ctx, device=args.device, threads=args.threads,
                                                   kv_slots=max(top, 2) + 1))  # +1: the default slot
    llama = None
    if not args.skip_llama_cpp and args.model.suffix == ".gguf" and args.device == "cpu":
        llama = LlamaCppPeer(args.model, args.threads, args.prompt_tokens + args.new_tokens + 16)
    print(f"model {args.model.name}, {engine.backend} decode steps, {args.threads} threads, "
          f"{engine.options.kv_slots} KV slots of {engine.kv_slot_bytes / 2**20:.0f} MiB; prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens, sessions {args.concurrency}", flush=True)
    rows = decode_part(engine, llama, args)
    print(f"\n{'sessions':>8s} " + " ".join(f"{k:>22s}" for k in rows[0] if k != "concurrency"))
    for r in rows:
        print(f"{r['concurrency']:8d} " + " ".join(f"{v:22.2f}" for k, v in r.items() if k != "concurrency"))
    print("\nfollow-up prefill, two interleaved conversations:", flush=True)
    follow = followup_part(engine, args.turns, new_tokens=24)
    for key, value in follow["summary"].items():
        print(f"  {key}: {value:.2f}")
    engine.close()
    report = {
        "model": args.model.name,
        "backend": engine.backend,
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores)",
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "decode": rows,
        "followup": follow,
    }
    title = f"{args.model.name}: {args.threads} threads, {report['device']}"
    plot(rows, follow, title, args.plot)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"plot: {args.plot}\njson: {args.json}")
    return report


if __name__ == "__main__":
    main()
