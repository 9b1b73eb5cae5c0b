#!/usr/bin/env python
"""End-of-turn score accuracy on a labelled set: the model alone vs the model plus the trail-off rule.

bench/data/eot_utterances.tsv holds complete and incomplete user turns (questions, statements,
requests, single words, backchannels, numbers; mid-sentence cuts, trailing fillers, trailing
ellipses), written as Whisper writes them. Each is scored by `EndOfTurnScorer` on the real engine
and embedded model, in the chat context of a live session's first turn (persona as system prompt,
the greeting as the assistant's turn), in the same run:

  before   `EndOfTurnScorer.model_prob`: the model's P(end) after the text, punctuation stripped
  after    `EndOfTurnScorer.score`: the same, scaled by UNFINISHED_FACTOR when the text trails off
           (hesitation, dangling connective, ellipsis: engine/end_of_turn.py `trails_off`)

At TurnTakingConfig's thresholds, complete_prob (at or above: answer at once) and incomplete_prob
(at or below: wait the longest), it prints the confusion matrix (complete = positive), accuracy,
accuracy per kind, and the ROC AUC of the score.

Unsure tails (the last word(s) Whisper was unsure of; agent/turns.py scores them by `chain`):
every complete turn of two words or more gets its last word marked unsure; every incomplete turn
with a `guess` gets that guess appended as an unsure tail (Whisper finishing a fragment after a
pause: "book a table for [it.]"). Each rule then decides: `text` (ignore the tail), `min` (the
session's rule until 2026-12-04), `mean`, and `chain` (the session's rule: engine/end_of_turn.py
`unsure_tail_prob`: p_sure + p_tail * p_text; `chain_sqrt` with sqrt(p_tail)). Reported: how many
complete turns wait (P below complete_prob) and how long on average, and how many guessed
fragments are answered at once.

    python bench/eot_accuracy.py [--threads 1] [--json PATH]

--json (default bench/results/eot_accuracy.json) writes every score and the figures, a PNG beside.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rejoinder.agent.config import DEFAULT_PERSONA, AgentConfig, TurnTakingConfig
from rejoinder.engine import Engine, EngineOptions
from rejoinder.engine.end_of_turn import EndOfTurnScorer, trails_off, unsure_tail_prob
from rejoinder.streaming.asr_stream import without_tail
from rejoinder.streaming.assets import resolve

DATA = Path(__file__).with_name("data") / "eot_utterances.tsv"


@dataclass(frozen=True)
class Item:
    complete: bool
    kind: str
    text: str
    guess: str = ""


def load_items(path: Path = DATA) -> list[Item]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) < 3 or cols[0] not in ("complete", "incomplete"):
            raise SystemExit(f"{path}:{n}: expected label<TAB>kind<TAB>text[<TAB>guess], got {line!r}")
        items.append(Item(cols[0] == "complete", cols[1], cols[2], cols[3].strip() if len(cols) > 3 else ""))
    return items


def confusion(labels: list[bool], scores: list[float], threshold: float, *, inclusive: bool) -> dict:
    """Predicted complete: score >= threshold (inclusive) or > threshold."""
    pred = [(s >= threshold) if inclusive else (s > threshold) for s in scores]
    tp = sum(p and y for p, y in zip(pred, labels))
    fn = sum((not p) and y for p, y in zip(pred, labels))
    fp = sum(p and not y for p, y in zip(pred, labels))
    tn = sum((not p) and not y for p, y in zip(pred, labels))
    return {"threshold": threshold, "tp": tp, "fn": fn, "fp": fp, "tn": tn, "accuracy": (tp + tn) / len(labels)}


def auc(labels: list[bool], scores: list[float]) -> float:
    """P(a complete turn scores above an incomplete one), ties counting half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def roc(labels: list[bool], scores: list[float]) -> tuple[list[float], list[float]]:
    pts = sorted(set(scores), reverse=True)
    npos, nneg = sum(labels), len(labels) - sum(labels)
    fpr, tpr = [0.0], [0.0]
    for t in pts:
        tpr.append(sum(s >= t and y for s, y in zip(scores, labels)) / npos)
        fpr.append(sum(s >= t and not y for s, y in zip(scores, labels)) / nneg)
    return fpr, tpr


def summary(items: list[Item], scores: list[float], cfg: TurnTakingConfig) -> dict:
    labels = [it.complete for it in items]
    kinds = sorted({(it.complete, it.kind) for it in items}, key=lambda k: (not k[0], k[1]))
    per_kind = {}
    for complete, kind in kinds:
        sel = [(s, it) for s, it in zip(scores, items) if it.complete == complete and it.kind == kind]
        right = sum((s >= cfg.complete_prob) == it.complete for s, it in sel)
        per_kind[f"{'complete' if complete else 'incomplete'}/{kind}"] = {
            "n": len(sel), "accuracy_at_complete_prob": right / len(sel),
            "mean_extra_wait_s": sum(cfg.extra_wait_s(s) for s, _ in sel) / len(sel),
        }
    return {
        "at_complete_prob": confusion(labels, scores, cfg.complete_prob, inclusive=True),
        "at_incomplete_prob": confusion(labels, scores, cfg.incomplete_prob, inclusive=False),
        "auc": auc(labels, scores),
        "per_kind": per_kind,
    }


RULES = {
    "text": lambda pt, ps, ptail: pt,
    "min": lambda pt, ps, ptail: min(pt, ps),
    "mean": lambda pt, ps, ptail: 0.5 * (pt + ps),
    "chain": lambda pt, ps, ptail: unsure_tail_prob(pt, ps, ptail) if ptail is not None else min(pt, ps),
    # the same with the tail's probability softened (sqrt): fewer complete turns wait, more guesses pass
    "chain_sqrt": lambda pt, ps, ptail: min(1.0, ps + (ptail or 0.0) ** 0.5 * pt),
}


def unsure_study(scorer: EndOfTurnScorer, history: list, items: list[Item], cfg: TurnTakingConfig) -> dict:
    cases = []
    for it in items:
        if it.complete and len(it.text.split()) >= 2:
            text, tail = it.text, it.text.split()[-1]
        elif not it.complete and it.guess:
            text = f"{it.text.rstrip(' .,')} {it.guess}"
            tail = it.guess
        else:
            continue
        sure = without_tail(text, tail)
        pt, ps, ptail = scorer.unsure_tail_parts(history, text, sure)
        cases.append({"complete": it.complete, "kind": it.kind, "text": text, "tail": tail,
                      "p_text": pt, "p_sure": ps, "p_tail": ptail})
    out: dict = {"cases": cases, "rules": {}}
    for name, rule in RULES.items():
        res = {}
        for complete in (True, False):
            sel = [rule(c["p_text"], c["p_sure"], c["p_tail"]) for c in cases if c["complete"] == complete]
            res["complete" if complete else "incomplete_guessed"] = {
                "n": len(sel),
                "answered_at_once": sum(p >= cfg.complete_prob for p in sel) / len(sel),
                "wait_longest": sum(p <= cfg.incomplete_prob for p in sel) / len(sel),
                "mean_extra_wait_s": sum(cfg.extra_wait_s(p) for p in sel) / len(sel),
            }
        out["rules"][name] = res
    return out


def print_summary(name: str, s: dict) -> None:
    print(f"\n[{name}] AUC {s['auc']:.3f}")
    for key, label in (("at_complete_prob", "P >= complete_prob"), ("at_incomplete_prob", "P > incomplete_prob")):
        c = s[key]
        print(f"  predicted complete when {label} ({c['threshold']}): accuracy {100 * c['accuracy']:.1f}%\n"
              f"                 pred complete  pred incomplete\n"
              f"    complete     {c['tp']:13d}  {c['fn']:15d}\n"
              f"    incomplete   {c['fp']:13d}  {c['tn']:15d}")


def plot(path: Path, items: list[Item], scores: dict[str, list[float]], summaries: dict, study: dict,
         cfg: TurnTakingConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [it.complete for it in items]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for name, sc in scores.items():
        fpr, tpr = roc(labels, sc)
        ax.plot(fpr, tpr, label=f"{name} (AUC {summaries[name]['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("incomplete turns read as complete")
    ax.set_ylabel("complete turns read as complete")
    ax.set_title("ROC of the end-of-turn score")
    ax.legend(fontsize=8)
    ax = axes[1]
    kinds = list(summaries["before"]["per_kind"])
    width = 0.4
    for k, name in enumerate(scores):
        vals = [100 * summaries[name]["per_kind"][kd]["accuracy_at_complete_prob"] for kd in kinds]
        ax.barh([i + (k - 0.5) * width for i in range(len(kinds))], vals, width, label=name)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel(f"% right at complete_prob {cfg.complete_prob}")
    ax.set_title("accuracy by kind")
    ax.legend(fontsize=8)
    ax = axes[2]
    rules = list(study["rules"])
    xs = range(len(rules))
    wait = [100 * (1 - study["rules"][r]["complete"]["answered_at_once"]) for r in rules]
    early = [100 * study["rules"][r]["incomplete_guessed"]["answered_at_once"] for r in rules]
    ax.bar([x - 0.2 for x in xs], wait, 0.4, label="complete, last word unsure: waits")
    ax.bar([x + 0.2 for x in xs], early, 0.4, label="fragment + guessed word: answered at once")
    ax.set_xticks(list(xs), rules)
    ax.set_ylabel("%")
    ax.set_title("unsure-tail rules")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="GGUF file or safetensors folder (default: embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path(__file__).with_name("results") / "eot_accuracy.json")
    args = ap.parse_args(argv)

    items = load_items()
    cfg = TurnTakingConfig()
    engine = Engine.load(resolve("llm", args.model or None), EngineOptions(max_seq_len=2048, threads=args.threads))
    scorer = EndOfTurnScorer(engine)
    history = [{"role": "system", "content": DEFAULT_PERSONA}, {"role": "assistant", "content": AgentConfig().greeting}]
    before = [scorer.model_prob(history, it.text) for it in items]
    after = [scorer.score(history, it.text) for it in items]
    scores = {"before": before, "after": after}
    summaries = {name: summary(items, sc, cfg) for name, sc in scores.items()}
    n_complete = sum(it.complete for it in items)
    print(f"{len(items)} utterances ({n_complete} complete, {len(items) - n_complete} incomplete), "
          f"{sum(trails_off(it.text) for it in items)} trail off")
    for name, s in summaries.items():
        print_summary(name, s)
    print("\naccuracy at complete_prob by kind (before -> after), mean extra wait after:")
    for kind, b in summaries["before"]["per_kind"].items():
        a = summaries["after"]["per_kind"][kind]
        print(f"  {kind:24s} n={b['n']:3d}  {100 * b['accuracy_at_complete_prob']:5.1f}% -> "
              f"{100 * a['accuracy_at_complete_prob']:5.1f}%   wait {a['mean_extra_wait_s']:.2f} s")
    wrong = [(it, a) for it, a in zip(items, after) if (a >= cfg.complete_prob) != it.complete]
    print(f"\nstill wrong after ({len(wrong)}):")
    for it, a in wrong:
        print(f"  {'complete  ' if it.complete else 'incomplete'} {it.kind:12s} {a:.4f} {it.text!r}")

    study = unsure_study(scorer, history, items, cfg)
    print("\nunsure tails:           complete turns, last word unsure | fragments + guessed word")
    print("  rule        waits  longest  mean wait  |  answered at once  mean wait")
    for name, r in study["rules"].items():
        c, g = r["complete"], r["incomplete_guessed"]
        print(f"  {name:10s} {100 * (1 - c['answered_at_once']):5.1f}%  {100 * c['wait_longest']:6.1f}%  "
              f"{c['mean_extra_wait_s']:7.2f} s  |  {100 * g['answered_at_once']:15.1f}%  "
              f"{g['mean_extra_wait_s']:7.2f} s")
    print(f"  (n = {study['rules']['min']['complete']['n']} complete, "
          f"{study['rules']['min']['incomplete_guessed']['n']} guessed fragments)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"model": str(resolve("llm", args.model or None)), "backend": engine.backend,
               "thresholds": {"complete_prob": cfg.complete_prob, "incomplete_prob": cfg.incomplete_prob},
               "summaries": summaries, "unsure_tails": study,
               "items": [{"complete": it.complete, "kind": it.kind, "text": it.text, "before": b, "after": a}
                         for it, b, a in zip(items, before, after)]}
        args.json.write_text(json.dumps(out, indent=1))
        png = args.json.with_suffix(".png")
        plot(png, items, scores, summaries, study, cfg)
        print(f"wrote {args.json} and {png}")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
