"""`rejoinder demo`: speak a question with the embedded voice, then answer it out loud (all offline)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import config
from .reply import print_timings


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="speak a question and answer it out loud, offline")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--out-dir", default="artifacts")
    config.add_flags(p, ("models", "generation"))
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rejoinder.streaming.audio import write_wav

    from ..models import Models
    from ..reply import reply_to_file

    cfg = config.from_args(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print("loading the embedded models…", file=sys.stderr)
    models = Models(cfg)
    try:
        question = out_dir / "demo-question.wav"
        write_wav(question, models.tts.synthesize(args.question), models.tts.sample_rate)
        answer = out_dir / "demo-answer.wav"
        reply = reply_to_file(models, cfg, question, answer)
    finally:
        models.close()
    print_timings(reply)
    print(f"question : {question}\nanswer   : {answer}")
    return 0
