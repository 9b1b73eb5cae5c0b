"""`rejoinder chat`: a text REPL on the engine; history kept, so each turn only prefills its new tokens."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import config


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="a text REPL on the engine")
    p.add_argument("--stats", action="store_true", help="print tokens/s and prefix reuse after each answer")
    config.add_flags(p, ("models", "generation"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rejoinder.engine import Engine, EngineOptions
    from rejoinder.engine.history import trim_history
    from rejoinder.streaming.assets import resolve

    cfg = config.from_args(args)
    options = EngineOptions(max_seq_len=cfg.max_context, device=cfg.device, threads=cfg.threads,
                            backend=cfg.llm_backend)
    engine = Engine.load(resolve("llm", cfg.llm_model or None), options)
    params = cfg.sampling_params()
    history = [{"role": "system", "content": cfg.persona}]
    interactive = sys.stdin.isatty()
    if interactive:
        print("Rejoinder chat — /reset clears the history, /quit or Ctrl-D leaves.")
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                history = history[:1]
                continue
            history.append({"role": "user", "content": line})
            # Oldest whole exchanges go first, never the persona (the rule every history follows).
            history = trim_history(history, lambda m: len(engine.chat_ids(list(m))),
                                   engine.max_seq_len - params.max_new_tokens - 1)
            ids = engine.chat_ids(history)
            print("rejoinder> " if interactive else "", end="", flush=True)
            out = []
            for ev in engine.generate(ids, params):
                out.append(ev.token_id)
                print(ev.text, end="", flush=True)
            print()
            s = engine.last_stats
            if args.stats:
                print(f"  [{s.new_tokens} tokens, {s.decode_tok_s:.1f} tok/s, first token {s.ttft_s * 1000:.0f} ms, "
                      f"prefill {s.prefill_tokens} new / {s.reused_tokens} reused]", file=sys.stderr)
            history.append({"role": "assistant", "content": engine.tokenizer.decode(out).strip()})
    except KeyboardInterrupt:
        print()
    finally:
        engine.close()
    return 0
