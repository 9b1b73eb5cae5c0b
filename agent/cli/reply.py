"""`rejoinder reply`: answer a spoken question in a WAV file with a spoken WAV."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from rejoinder.errors import BadInputError

from .. import config
from .outputs import check_writable


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("reply", help="answer a spoken question in a WAV file with a spoken WAV")
    p.add_argument("--in", dest="in_path", required=True, help="question WAV (any common rate/format)")
    p.add_argument("--out", dest="out_path", required=True, help="answer WAV to write")
    p.add_argument("--json", action="store_true", help="print one JSON object: transcript, answer, timings")
    config.add_flags(p, ("models", "generation"))
    p.set_defaults(func=run)
    return p


def print_timings(reply: Any, stream: TextIO = sys.stdout) -> None:
    t = reply.timings
    print(f"you said : {reply.transcript}", file=stream)
    print(f"answer   : {reply.answer}", file=stream)
    print(
        f"timings  : ASR {t.asr_s * 1000:.0f} ms | LLM first token {t.llm_ttft_s * 1000:.0f} ms, "
        f"{t.llm_tokens} tokens at {t.llm_tok_s:.1f} tok/s | TTS {t.tts_s * 1000:.0f} ms | "
        f"total {t.total_s * 1000:.0f} ms (models loaded in {t.load_s:.1f} s)",
        file=stream,
    )


def run(args: argparse.Namespace) -> int:
    from rejoinder.streaming.audio import read_wav, write_wav

    cfg = config.from_args(args)
    in_path, out_path = Path(args.in_path), Path(args.out_path)
    if not in_path.exists():
        raise BadInputError(f"input file not found: {in_path}")
    # Bad input and an unwritable output fail before any model loads.
    samples, rate = read_wav(in_path, max_seconds=cfg.max_input_seconds)
    check_writable(out_path, "--out")
    from ..models import Models  # imported only now: torch alone takes seconds to import
    from ..reply import reply_to_audio

    models = Models(cfg)
    try:
        reply = reply_to_audio(models, cfg, samples, rate)
    finally:
        models.close()
    write_wav(out_path, reply.audio, reply.sample_rate)
    if args.json:
        print(json.dumps(reply.as_json(), ensure_ascii=False))
    else:
        print_timings(reply)
        print(f"wrote    : {out_path}")
    return 0
