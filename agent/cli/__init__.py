"""The `rejoinder` command line: flags -> the one typed config (`agent.config`) -> one module per subcommand.

    reply   answer a spoken question in a WAV file with a spoken WAV      (agent/cli/reply.py)
    chat    a text REPL on the engine                                      (agent/cli/chat.py)
    demo    speak a question and answer it out loud, offline               (agent/cli/demo.py)
    talk    a full-duplex session over a recorded conversation             (agent/cli/talk.py)
    serve   the web page and WebRTC sessions                               (agent/cli/serve.py)
    monitor watch live sessions over MQTT                                  (agent/cli/monitor.py)
    livekit a LiveKit agent worker                                         (agent/cli/livekit.py)
    assets  prepare and list the embedded models                           (agent/cli/assets.py)

Each module has `add_parser(subparsers)` and `run(args) -> exit status`. Errors a user can cause
(`rejoinder.errors.RejoinderError`) are printed as one line, `rejoinder: error: …`, with exit
status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from rejoinder.errors import RejoinderError

from . import assets, chat, demo, livekit, monitor, reply, serve, talk

log = logging.getLogger("rejoinder.cli")

SUBCOMMANDS = (reply, chat, demo, talk, serve, monitor, livekit, assets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rejoinder", description="A real-time, self-hosted voice agent.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except RejoinderError as exc:
        if args.verbose >= 2:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"rejoinder: error: {message}", file=sys.stderr)
        return 2
