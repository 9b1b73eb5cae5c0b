"""`rejoinder demo`: speak a question with the embedded voice, then answer it out loud (all offline)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rejoinder.errors import OutputError

from .. import config
from .outputs import check_writable
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

    cfg = config.from_args(args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out-dir {out_dir}: is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out-dir {out_dir}: cannot create it ({exc.strerror or exc})") from None
    question, answer = out_dir / "demo-question.wav", out_dir / "demo-answer.wav"
    for path in (question, answer):
        check_writable(path, "--out-dir")  # before the models load
    print("loading the embedded models…", file=sys.stderr)
    from ..models import Models  # imported only now: torch alone takes seconds to import
    from ..reply import reply_to_file

    models = Models(cfg)
    try:
        write_wav(question, models.tts.synthesize(args.question), models.tts.sample_rate)
        reply = reply_to_file(models, cfg, question, answer)
    finally:
        models.close()
    print_timings(reply)
    print(f"question : {question}\nanswer   : {answer}")
    return 0
