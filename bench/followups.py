#!/usr/bin/env python
"""Follow-up questions: how often is a follow-up answered with the previous answer again?

Each conversation of bench/data/followups.json is a first question, the model's answer, then a
follow-up ("What is the capital of France?" -> "And what is it famous for?"). The conversation is
built as the session builds it (`rejoinder.agent.conversation.Conversation`, persona as system
prompt, history as text, the engine's prefix cache) and answered by the real engine on the embedded
SmolLM2-135M, text only, under each configuration, in the same run:

  before      the sampling the session used so far: greedy, no guard
  guard       the same, plus the repetition guard the session now passes (`SamplingParams.avoid` =
              the last answers' tokens, no run of `--ngram` tokens copied; engine/sampling.py)
  guard_nN    the guard with another n-gram length (`--sweep 3,6`)
  strict      the guard masking word continuations too (`--strict`; it misspells names: "Rowle's")
  sampled     temperature 0.7 (seeded), no guard: does sampling alone help? (`--sampled`)
  peer        another system prompt, without and with the guard (`--peer-persona TEXT`): the
              prompt layout's part (the persona's "keep every answer short" line is what the
              embedded model copies after)

Per configuration it prints and writes:
  repeat rate   follow-up answers equal to the previous answer after normalising (case,
                punctuation, spaces), or sharing >= 0.9 of their words with it (multiset overlap over
                the longer answer's word count)
  on topic      the answer shares a content word with the follow-up question or names one of the
                pair's topic words (bench/data/followups.json)
  relevant      on topic and not a repeat
It also checks that the prefix cache is not the cause: the follow-up prompt's next-token
probabilities with the conversation cached vs prefilled from scratch (max abs difference).

    python bench/followups.py [--ngram 4] [--sweep 3,6] [--strict] [--sampled] [--peer-persona TEXT]
                              [--threads 1] [--json PATH]

--json (default bench/results/followups.json) writes the figures, every answer, and a PNG beside.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from rejoinder.agent.config import DEFAULT_PERSONA
from rejoinder.agent.conversation import Conversation
from rejoinder.engine import Engine, EngineOptions, RepetitionGuard, SamplingParams
from rejoinder.engine.sampling import banned_tokens, sample
from rejoinder.streaming.assets import resolve

DATA = Path(__file__).with_name("data") / "followups.json"
STOP = set(
    "a an the and or but so of to in on at for from by with about as is are was were be been am do does did "
    "what who whom whose which when where why how it its it's this that these those there here he she they "
    "them his her their you your i me my we our us can could should would will shall may might must "
    "much many any some if then than also just not no yes".split()
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[.,'][a-z0-9]+)*", text.lower())


def normalised(text: str) -> str:
    return " ".join(words(text))


def overlap(a: str, b: str) -> float:
    """Shared words (multiset) over the longer answer's word count."""
    wa, wb = words(a), words(b)
    if not wa or not wb:
        return 0.0
    return sum((Counter(wa) & Counter(wb)).values()) / max(len(wa), len(wb))


def is_repeat(answer: str, previous: str) -> bool:
    return normalised(answer) == normalised(previous) or overlap(answer, previous) >= 0.9


def stem(w: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(w) > len(suffix) + 2 and w.endswith(suffix):
            return w[: -len(suffix)]
    return w


def on_topic(answer: str, followup: str, topic: list[str]) -> bool:
    said = {stem(w) for w in words(answer)}
    asked = {stem(w) for w in words(followup) if w not in STOP}
    return bool(said & asked) or bool(said & {stem(t.lower()) for t in topic})


@dataclass(frozen=True)
class Variant:
    name: str
    ngram: int  # 0: no guard
    temperature: float = 0.0
    seed: int | None = None
    strict: bool = False  # the guard masks word continuations too
    persona: str | None = None  # None: --persona


def answer(engine: Engine, conv: Conversation, base: SamplingParams, v: Variant) -> tuple[str, int, float]:
    avoid = None
    if v.ngram:
        guard = conv.answer_guard()  # what the session passes (agent/speaker.py)
        avoid = dataclasses.replace(guard, ngram=v.ngram, exempt=frozenset() if v.strict else guard.exempt)
    params = dataclasses.replace(base, temperature=v.temperature, seed=v.seed, avoid=avoid)
    ids = conv.prompt_ids()
    t0 = time.perf_counter()
    out = [ev.token_id for ev in engine.generate(ids, params)]
    return engine.tokenizer.decode(out).strip(), len(out), time.perf_counter() - t0


def run_variant(engine: Engine, pairs: list[dict], v: Variant, persona: str, base: SamplingParams) -> dict:
    persona = v.persona if v.persona is not None else persona
    rows = []
    tokens, seconds = 0, 0.0
    for p in pairs:
        conv = Conversation(engine.tokenizer, persona)
        conv.add_user(p["first"])
        first, n1, s1 = answer(engine, conv, base, v)
        conv.add_assistant(first)
        conv.add_user(p["followup"])
        second, n2, s2 = answer(engine, conv, base, v)
        tokens += n1 + n2
        seconds += s1 + s2
        rep = is_repeat(second, first)
        top = on_topic(second, p["followup"], p["topic"])
        rows.append({"first": p["first"], "first_answer": first, "followup": p["followup"], "answer": second,
                     "overlap": round(overlap(second, first), 3), "repeat": rep, "on_topic": top,
                     "relevant": top and not rep})
        print(f"\r{v.name:>10}: {len(rows)}/{len(pairs)}", end="", flush=True)
    print()
    n = len(rows)
    return {
        "variant": dataclasses.asdict(v),
        "pairs": n,
        "repeat_rate": sum(r["repeat"] for r in rows) / n,
        "exact_repeat_rate": sum(normalised(r["answer"]) == normalised(r["first_answer"]) for r in rows) / n,
        "on_topic_rate": sum(r["on_topic"] for r in rows) / n,
        "relevant_rate": sum(r["relevant"] for r in rows) / n,
        "mean_overlap": sum(r["overlap"] for r in rows) / n,
        "mean_words": sum(len(words(r["answer"])) for r in rows) / n,
        "tokens": tokens,
        "tok_s": tokens / seconds if seconds else 0.0,
        "rows": rows,
    }


def prefix_cache_diff(engine: Engine, persona: str, pair: dict, first_answer: str) -> float:
    conv = Conversation(engine.tokenizer, persona)
    conv.add_user(pair["first"])
    engine.next_token_probs(conv.prompt_ids())  # the cache now holds the first turn
    conv.add_assistant(first_answer)
    conv.add_user(pair["followup"])
    ids = conv.prompt_ids()
    cached = engine.next_token_probs(ids)
    reused = engine.last_stats.reused_tokens
    engine.reset()
    fresh = engine.next_token_probs(ids)
    print(f"prefix cache: {reused} of {len(ids)} prompt tokens reused")
    return float((cached - fresh).abs().max())


def guard_cost(engine: Engine, results: list[dict], ngram: int) -> dict:
    """The guard's time per sampled token (3 previous answers) against a decode step, same run."""
    rows = results[0]["rows"]
    tok = engine.tokenizer
    guard = RepetitionGuard.of_texts(tok, [r["first_answer"] for r in rows[:3]], ngram)
    params = SamplingParams(avoid=guard)
    answers = [tok.encode(r["answer"]) for r in rows[:10]]
    logits = torch.zeros(1, tok.vocab_size)
    calls = sum(len(ids) for ids in answers)

    def per_call(p: SamplingParams) -> float:  # best of 3 passes: the box is shared
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for ids in answers:
                for i in range(len(ids)):
                    sample(logits, p, generated=ids[:i])
            best = min(best, (time.perf_counter() - t0) / calls)
        return best

    without, with_guard = per_call(SamplingParams()), per_call(params)
    banned_steps = sum(bool(banned_tokens(ids[:i], params)) for ids in answers for i in range(len(ids)))
    conv = Conversation(tok, DEFAULT_PERSONA)
    conv.add_user(rows[0]["first"])
    step_s = min(_decode_step_s(engine, conv.prompt_ids()) for _ in range(3))
    return {"sample_us": 1e6 * without, "sample_with_guard_us": 1e6 * with_guard,
            "steps_with_a_ban": banned_steps / calls,
            "decode_step_ms": 1e3 * step_s, "guard_share_of_step": (with_guard - without) / step_s}


def _decode_step_s(engine: Engine, ids: list[int]) -> float:
    for _ in engine.generate(ids, SamplingParams(max_new_tokens=24)):
        pass
    st = engine.last_stats
    return st.decode_s / max(1, st.new_tokens - 1)


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"]["name"] for r in results]
    metrics = [("repeat_rate", "repeat of previous answer"), ("relevant_rate", "relevant (on topic, no repeat)"),
               ("on_topic_rate", "on topic")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    width = 0.8 / len(metrics)
    for k, (key, label) in enumerate(metrics):
        xs = [i + (k - 1) * width for i in range(len(names))]
        vals = [100 * r[key] for r in results]
        ax.bar(xs, vals, width, label=label)
        for x, val in zip(xs, vals):
            ax.text(x, val + 1, f"{val:.0f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("% of follow-up answers")
    ax.set_ylim(0, 110)
    ax.set_title(f"Follow-up answers, SmolLM2-135M, {results[0]['pairs']} two-turn conversations")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="GGUF file or safetensors folder (default: embedded SmolLM2)")
    ap.add_argument("--ngram", type=int, default=RepetitionGuard().ngram, help="the guard's n-gram length")
    ap.add_argument("--sweep", default="", help="more n-gram lengths to try, comma-separated")
    ap.add_argument("--sampled", action="store_true", help="add temperature 0.7 without the guard")
    ap.add_argument("--strict", action="store_true", help="add the guard masking word continuations too")
    ap.add_argument("--persona", default=DEFAULT_PERSONA)
    ap.add_argument("--peer-persona", default="",
                    help="also run this system prompt, without and with the guard (the prompt-layout peer)")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="only the first N conversations")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "followups.json")
    args = ap.parse_args(argv)

    pairs = json.loads(DATA.read_text())["pairs"]
    pairs = pairs[: args.limit] if args.limit else pairs
    engine = Engine.load(resolve("llm", args.model or None), EngineOptions(max_seq_len=2048, threads=args.threads))
    base = SamplingParams(max_new_tokens=args.max_new_tokens)
    variants = [Variant("before", 0), Variant("guard", args.ngram)]
    variants += [Variant(f"guard_n{n}", int(n)) for n in args.sweep.split(",") if n and int(n) != args.ngram]
    if args.strict:
        variants.append(Variant("strict", args.ngram, strict=True))
    if args.sampled:
        variants.append(Variant("sampled", 0, temperature=0.7, seed=1))
    if args.peer_persona:
        variants += [Variant("peer", 0, persona=args.peer_persona),
                     Variant("peer+guard", args.ngram, persona=args.peer_persona)]
    results = [run_variant(engine, pairs, v, args.persona, base) for v in variants]
    diff = prefix_cache_diff(engine, args.persona, pairs[0], results[0]["rows"][0]["first_answer"])
    cost = guard_cost(engine, results, args.ngram)

    print(f"\n{len(pairs)} follow-ups, {engine.backend} backend; prefix cache vs fresh prefill: "
          f"max |dP| = {diff:.2e}")
    print(f"{'variant':>10} {'repeat':>7} {'exact':>6} {'on topic':>9} {'relevant':>9} {'overlap':>8} "
          f"{'words':>6} {'tok/s':>6}")
    for r in results:
        print(f"{r['variant']['name']:>10} {100 * r['repeat_rate']:6.0f}% {100 * r['exact_repeat_rate']:5.0f}% "
              f"{100 * r['on_topic_rate']:8.0f}% {100 * r['relevant_rate']:8.0f}% {r['mean_overlap']:8.2f} "
              f"{r['mean_words']:6.1f} {r['tok_s']:6.1f}")
    before, after = results[0], results[1]
    print(f"guard vs before: repeats {100 * before['repeat_rate']:.0f}% -> {100 * after['repeat_rate']:.0f}%, "
          f"relevant {100 * before['relevant_rate']:.0f}% -> {100 * after['relevant_rate']:.0f}%")
    print(f"guard cost: sampling {cost['sample_us']:.0f} -> {cost['sample_with_guard_us']:.0f} us per token, "
          f"{100 * cost['guard_share_of_step']:.2f}% of a {cost['decode_step_ms']:.1f} ms decode step "
          f"({100 * cost['steps_with_a_ban']:.0f}% of the steps mask a token: the copying answers) "
          f"(tok/s above: whole runs on a shared box, not comparable)")
    for b, a in zip(before["rows"], after["rows"]):
        if b["repeat"] or a["repeat"]:
            print(f"- {b['followup']!r}\n    before: {b['answer']!r}\n    guard:  {a['answer']!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"model": str(resolve("llm", args.model or None)), "backend": engine.backend, "persona": args.persona,
               "prefix_cache_max_abs_prob_diff": diff, "guard_cost": cost, "results": results}
        args.json.write_text(json.dumps(out, indent=1))
        png = args.json.with_suffix(".png")
        plot(png, results)
        print(f"wrote {args.json} and {png}")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
