"""Latency as a WebRTC caller hears it: voice-to-voice and barge-in, and where every millisecond goes.

`rejoinder serve` runs in its own process (loopback only: `--host 127.0.0.1 --ice-host 127.0.0.1`, a
free port); this process is the caller (tests/webrtc_client.RTCClient, aiortc): a microphone that
hands over each 20 ms frame when it has been captured, and an ear that records every received frame
with its arrival time and honours the page's barge-in mute (web/rtc.js `agentAudioGate`). Questions
and interruptions are synthesised at run time (espeak-ng: a different voice from the agent's Piper).
Both processes stamp `time.monotonic()` (one clock per machine on Linux), and the server's stamps of
exactly the frames that matter (the caller's last word, the answer's first frame) come over the
data channel (`{"type": "transport_stats"}`), matched by RTP timestamp.

Voice-to-voice as heard = first audible answer frame at the caller - the caller's last spoken sample:

    mic packetisation   the frame holding the last sample is complete (0-20 ms: a microphone's frame)
    in transport        caller's encoder, loopback, server jitter buffer, decoder, audio_in()
    server              VAD hang-over, ASR, end of turn, LLM, TTS, playout start (the session's part)
    out resample        the session's resampling to 48 kHz and the transport's re-framing
    out track queue     waiting in the outgoing track for the encoder
    out wire            Opus encoding, loopback, the caller's jitter buffer and decoder
    answer lead-in      quiet start of the answer audio until it is audible (RMS > -40 dBFS)

Barge-in as heard = when the caller stops hearing the agent - its speech onset: the page-equivalent
mute closes when the session's pause reaches it (`state` user_speaking "barge-in"), or the last frame
the server sent as the agent's speech has played (arrival + 20 ms), whichever comes first.

`--compare` also runs the "before" transport: aiortc's 4-packet jitter buffer at both ends
(`--receive-jitter-packets 4`, the caller's `jitter_packets=4`) and no mute on barge-in.

    python bench/webrtc_latency.py [--json bench/results/webrtc_latency.json] [--questions 6]
                                   [--interruptions 3] [--compare]
Writes a PNG next to the JSON. `measure_webrtc(url, ...)` runs the caller against any server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from speech import espeak_say, long_text, silence, trim  # noqa: E402
from webrtc_client import FRAME, RATE, RTCClient  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "How far away is the moon?",
    "Tell me a joke about cats.",
    "What is the tallest mountain in the world?",
    "Can you recommend a good book?",
    "Where is the nearest train station?",
]
INTERRUPTIONS = ["Wait, what is two plus two?", "Hold on, stop please.", "No, tell me about rivers instead.",
                 "Sorry, what time is it?"]
AUDIBLE_RMS = 300.0  # int16 RMS, about -40 dBFS: the answer is audible from here
TAIL_S = 1.5  # silence after each utterance, so the far end's endpointing sees it end
STAGES = ("mic_packetisation", "in_transport", "server", "out_resample", "out_track_queue", "out_wire",
          "answer_lead_in")
TRANSPORT_STAGES = ("mic_packetisation", "in_transport", "out_resample", "out_track_queue", "out_wire")
BARGE_STAGES = ("mic_packetisation", "in_transport", "server_decision", "event_to_caller")
TARGETS = {"heard_v2v_p50_s": 0.7, "barge_in_heard_p95_s": 0.3}


def pct(v: Sequence[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if len(v) else None


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(*, receive_jitter_packets: int = 0, extra: Sequence[str] = (), ready_timeout_s: float = 300.0,
                  log_path: Path | None = None, max_sessions: int = 1, launcher: Sequence[str] | None = None,
                  started: Callable[[subprocess.Popen], None] | None = None) -> Iterator[str]:
    """`rejoinder serve` in a subprocess on a free loopback port; yields its base URL once healthy.

    `launcher` replaces `python -m rejoinder.agent.cli` (a wrapper that instruments the server);
    `started` is told the process as soon as it exists (to sample its memory)."""
    port = free_port()
    cmd = [*(launcher or (sys.executable, "-m", "rejoinder.agent.cli")), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--ice-host", "127.0.0.1", "--max-sessions", str(max_sessions),
           "--receive-jitter-packets", str(receive_jitter_packets), *extra]
    log = open(log_path, "w") if log_path else tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if started is not None:
        started(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rejoinder serve exited with {proc.returncode} (log: {log_path or 'temporary'})")
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2) as r:
                    if json.load(r).get("ok"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rejoinder serve not healthy after {ready_timeout_s:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def _first_run_after(runs: list[dict], t: float) -> dict | None:
    for r in runs:
        if r["first_handed_at"] >= t - 0.002:
            return r
    return None


async def _ask(client: RTCClient, text: str, audio: np.ndarray, timeout_s: float,
               keep_audio: bool = False) -> dict[str, Any]:
    mark = time.monotonic()
    said = await client.say(np.concatenate([audio, silence(TAIL_S)]), 16_000)
    speech_end = said.start + audio.size / 16_000
    metrics = await client.wait_event(lambda e: e["type"] == "metrics", timeout_s, after=mark)
    await asyncio.sleep(0.3)  # the answer's last frames through the network
    ts_end = client.mic.ts_at(speech_end - 1e-6)
    st = await client.server_stats(frames_in=[ts_end])
    got = st["frames_in"].get(str(ts_end))
    first_sent = metrics.get("first_audio_sent_at")
    run = _first_run_after(st["runs"], first_sent) if first_sent is not None else None
    row: dict[str, Any] = {"question": text, "heard_text": metrics.get("user_text"),
                           "answer": metrics.get("agent_text"),
                           "server_voice_to_voice_s": metrics.get("voice_to_voice_s"),
                           "server_stages_s": {k: v for k, v in metrics.items()
                                               if k.endswith("_s") and k != "voice_to_voice_s"}}
    if run is not None and run["first_handed_at"] - first_sent > 0.25:
        # The server logs its last 64 speech runs; an answer that broke up into more has lost its first.
        run = None
        row["runs_lost"] = True
    if got is None or run is None:
        row["error"] = "no server stamps for the last word" if got is None else \
            "the answer's first speech run is not in the server's log" if row.get("runs_lost") else \
            "no answer audio found"
        if keep_audio:
            row["answer_audio"] = client.received_audio(since=speech_end, heard=True)
        return row
    first = client.frame_at(run["start_ts"])
    if first is None:
        row["error"] = "the answer's first frame never arrived"
        return row
    audible = next((f for f in client.frames if f.ts >= run["start_ts"] and f.at >= first.at and not f.muted
                    and rms(f.pcm) > AUDIBLE_RMS), None)
    frame_end = client.mic.slot(ts_end) + FRAME / RATE
    received = got["received_at"]
    stages = {
        "mic_packetisation": frame_end - speech_end,
        "in_transport": received - frame_end,
        "server": first_sent - received,
        "out_resample": run["first_queued_at"] - first_sent,
        "out_track_queue": run["first_handed_at"] - run["first_queued_at"],
        "out_wire": first.at - run["first_handed_at"],
        "answer_lead_in": (audible.at - first.at) if audible is not None else None,
    }
    mic = next((m for m in reversed(client.mic.sent) if m.ts == ts_end), None)
    detail = {}
    if mic is not None and mic.sent_at is not None and got.get("arrived_at") is not None:
        detail = {"caller_mic_late": mic.handed_at - frame_end, "caller_encode_send": mic.sent_at - mic.handed_at,
                  "loopback": got["arrived_at"] - mic.sent_at,
                  "server_jitter_buffer": got["released_at"] - got["arrived_at"],
                  "server_decode_queue": received - got["released_at"]}
    if first.arrived_at is not None:
        detail["caller_jitter_buffer"] = first.released_at - first.arrived_at
        detail["caller_decode_queue"] = first.at - first.released_at
    row.update({"heard_voice_to_voice_s": (audible.at - speech_end) if audible is not None else None,
                "first_frame_voice_to_voice_s": first.at - speech_end, "stages_s": stages, "detail_s": detail})
    if keep_audio:  # the answer as the caller heard it (48 kHz int16): everything after the question
        row["answer_audio"] = client.received_audio(since=speech_end, heard=True)
    return row


async def _interrupt(client: RTCClient, text: str, audio: np.ndarray, long: str, into_s: float,
                     timeout_s: float) -> dict[str, Any]:
    mark = time.monotonic()
    await client.control("say", {"text": long})
    began = await client.wait_event(lambda e: e["type"] == "agent_speech" and e["started"], 30, after=mark)
    await asyncio.sleep(into_s)
    said = await client.say(np.concatenate([audio, silence(TAIL_S)]), 16_000)
    onset = said.start
    row: dict[str, Any] = {"interruption": text}
    try:
        barge = await client.wait_event(lambda e: e["type"] == "barge_in" and e["outcome"] == "interruption",
                                        30, after=onset)
    except asyncio.TimeoutError:
        row["error"] = "no interruption was detected"
        return row
    with contextlib.suppress(asyncio.TimeoutError):  # the agent answers the interruption; let it finish
        await client.wait_event(lambda e: e["type"] == "metrics" and e["turn"] != began["turn"], timeout_s,
                                after=onset)
    await asyncio.sleep(0.3)
    nxt = [e["_received_at"] for e in client.events_of("agent_speech")
           if e["started"] and e["turn"] != began["turn"] and e["_received_at"] >= onset]
    horizon = min(nxt) if nxt else time.monotonic()
    ts_on = client.mic.ts_at(onset + 1e-6)  # onset is a frame boundary: the frame that starts there
    st = await client.server_stats(frames_in=[ts_on])
    got = st["frames_in"].get(str(ts_on))
    # The agent's audio: frames the server sent as speech (its runs), pauses between words included,
    # so a natural pause in the agent's sentence does not count as "stopped".
    runs = [(r["start_ts"], r["end_ts"] if r["end_ts"] is not None else 1 << 62) for r in st["runs"]]
    window = [f for f in client.frames if onset <= f.at < horizon and any(a <= f.ts <= b for a, b in runs)]
    heard = [f for f in window if not f.muted]
    mutes = [at for at, muted, _ in client.mutes if muted and onset <= at < horizon] if client.honour_mute else []
    muted_at = mutes[0] if mutes else None
    heard_end = heard[-1].at + FRAME / RATE if heard else onset
    heard_stop = min(heard_end, muted_at) if muted_at is not None else heard_end
    raw_stop = window[-1].at + FRAME / RATE if window else onset
    frame_end = client.mic.slot(ts_on) + FRAME / RATE
    stages: dict[str, float | None] = {"mic_packetisation": frame_end - onset}
    if got is not None:
        stages["in_transport"] = got["received_at"] - frame_end
        stages["server_decision"] = (barge["stopped_at"] - got["received_at"]) if barge.get("stopped_at") else None
    if muted_at is not None and barge.get("stopped_at") is not None:
        stages["event_to_caller"] = muted_at - barge["stopped_at"]
    row.update({"heard_stop_after_onset_s": heard_stop - onset, "unmuted_stop_after_onset_s": raw_stop - onset,
                "muted_after_onset_s": (muted_at - onset) if muted_at is not None else None,
                "server_reaction_s": barge.get("reaction_s"), "stages_s": stages})
    return row


async def measure_webrtc(url: str, *, questions: Sequence[str] = QUESTIONS, interruptions: Sequence[str] = (),
                         caller_jitter_packets: int | None = 0, honour_mute: bool = True,
                         timeout_s: float = 900.0, log: Any = print, keep_audio: bool = False,
                         source_address: str | None = None) -> dict[str, Any]:
    """Speak `questions` and `interruptions` to the server at `url` as one WebRTC caller; what it heard.

    `keep_audio`: each turn row also holds `answer_audio`, the answer as heard (48 kHz int16 array);
    `source_address`: signal from this local address (another caller, e.g. 127.0.0.2).

    Returns {"turns": [...], "barge_ins": [...], "summary": {...}, "server": transport stats,
    "caller_stages": {...}}. Bounded: every wait has a timeout and the whole run stops at `timeout_s`.
    """
    asked = [(q, trim(espeak_say(q))) for q in questions]  # synthesised before connecting: no stalls after
    cuts = [(q, trim(espeak_say(q))) for q in interruptions]
    long = long_text(70)
    deadline = time.monotonic() + timeout_s
    client = RTCClient(url, jitter_packets=caller_jitter_packets, honour_mute=honour_mute,
                       source_address=source_address)
    turns: list[dict] = []
    barges: list[dict] = []
    await client.connect()
    try:
        with contextlib.suppress(asyncio.TimeoutError):  # the greeting, if the agent has one
            await client.wait_event(lambda e: e["type"] == "agent_speech" and not e["started"], 60)
        for q, audio in asked:
            if time.monotonic() > deadline:
                break
            try:
                row = await _ask(client, q, audio, min(90.0, max(1.0, deadline - time.monotonic())), keep_audio)
            except asyncio.TimeoutError:
                row = {"question": q, "error": "no answer in time"}
            turns.append(row)
            v = row.get("heard_voice_to_voice_s")
            log(f"  {q[:38]:38s} heard {v if v is not None else float('nan'):.3f} s  "
                f"server {row.get('server_voice_to_voice_s') or float('nan'):.3f} s  {row.get('error', '')}")
            await asyncio.sleep(0.5)
        for i, (q, audio) in enumerate(cuts):
            if time.monotonic() > deadline:
                break
            try:
                row = await _interrupt(client, q, audio, long, 1.5 + 0.37 * i,
                                       min(90.0, max(1.0, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                row = {"interruption": q, "error": "timed out"}
            barges.append(row)
            log(f"  barge-in {q[:29]:29s} heard {row.get('heard_stop_after_onset_s') or float('nan'):.3f} s  "
                f"unmuted {row.get('unmuted_stop_after_onset_s') or float('nan'):.3f} s  "
                f"server {row.get('server_reaction_s') or float('nan'):.3f} s  {row.get('error', '')}")
            await asyncio.sleep(1.0)
        server = await client.server_stats()
    finally:
        if client.resource:  # hang up as a WHIP client does: the server frees the slot now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.hang_up(), 5.0)
        await client.close()
    return {"turns": turns, "barge_ins": barges, "summary": summarise(turns, barges),
            "server": {k: server[k] for k in server if k not in ("frames_in", "frames_out", "runs", "id", "type")},
            "caller_stages": client.stage_summary()}


def summarise(turns: list[dict], barges: list[dict]) -> dict[str, Any]:
    def col(rows: list[dict], key: str) -> list[float]:
        return [r[key] for r in rows if r.get(key) is not None]

    heard, first, srv = (col(turns, k) for k in ("heard_voice_to_voice_s", "first_frame_voice_to_voice_s",
                                                 "server_voice_to_voice_s"))
    b_heard, b_raw, b_srv = (col(barges, k) for k in ("heard_stop_after_onset_s", "unmuted_stop_after_onset_s",
                                                      "server_reaction_s"))

    def stage_means(rows: list[dict], names: Sequence[str], f: Any = np.mean) -> dict[str, float | None]:
        out = {}
        for n in names:
            v = [r["stages_s"][n] for r in rows if r.get("stages_s", {}).get(n) is not None]
            out[n] = float(f(v)) if v else None
        return out

    transport = [sum(r["stages_s"][n] for n in TRANSPORT_STAGES) for r in turns
                 if all(r.get("stages_s", {}).get(n) is not None for n in TRANSPORT_STAGES)]
    lead_in = col([r.get("stages_s", {}) for r in turns], "answer_lead_in")
    return {
        "answered": len(heard), "asked": len(turns),
        "transport_p50_s": pct(transport, 50), "transport_p95_s": pct(transport, 95),
        "answer_lead_in_p50_s": pct(lead_in, 50),
        "heard_v2v_p50_s": pct(heard, 50), "heard_v2v_p95_s": pct(heard, 95),
        "first_frame_v2v_p50_s": pct(first, 50), "server_v2v_p50_s": pct(srv, 50), "server_v2v_p95_s": pct(srv, 95),
        "v2v_stage_means_s": stage_means(turns, STAGES),
        "v2v_stage_p50_s": stage_means(turns, STAGES, np.median),
        "barge_ins": len(b_heard), "barge_in_heard_p50_s": pct(b_heard, 50), "barge_in_heard_p95_s": pct(b_heard, 95),
        "barge_in_unmuted_p50_s": pct(b_raw, 50), "barge_in_unmuted_p95_s": pct(b_raw, 95),
        "barge_in_server_p50_s": pct(b_srv, 50), "barge_in_stage_means_s": stage_means(barges, BARGE_STAGES),
        "barge_in_stage_p50_s": stage_means(barges, BARGE_STAGES, np.median),
    }


def resampling_delay() -> dict[str, dict[str, float]]:
    """How long 22.05 kHz TTS audio waits in resampling to 48 kHz and re-framing into 20 ms frames.

    No server, no clock: frames of 441 samples are handed over every 20 ms (call k covers content
    [20k, 20k+20) ms); a 48 kHz sample leaves with the first whole 960-sample frame that holds it.
    Delay = leaving call's time - the sample's content time; a path with no resampling gives -10 ms
    on average (a sample waits for the rest of its frame) and 0 for the first one. "soxr HQ" is
    what the session's speaker uses today (streaming.resample.StreamResampler, in agent/speaker.py,
    because the transport asks for 48 kHz); "swr" is the transport's own path (rtc_audio.Resampler,
    first frame sent at once), used when the session hands it TTS-rate audio.
    """
    from rejoinder.streaming.resample import StreamResampler
    from rejoinder.streaming.rtc_audio import Resampler

    def run(rs: Any, pad_first: bool) -> dict[str, float]:
        rng = np.random.default_rng(0)
        emitted, buf, sent, pad = [], 0, 0, None
        for _ in range(100):
            y = rs.process((rng.standard_normal(441) * 0.1).astype(np.float32)).size
            if pad is None and y:
                pad = (FRAME - y) if pad_first and y < FRAME else 0
                buf += pad
            buf += y
            while buf >= FRAME:
                buf -= FRAME
                sent += FRAME
            emitted.append(sent)
        pad = pad or 0
        d = []
        for j in range(0, emitted[-1] - pad - 4000, 97):
            k = next(k for k, e in enumerate(emitted) if e > j + pad)
            d.append(k * 0.02 - j / RATE)
        return {"first_ms": 1000 * d[0], "mean_ms": float(1000 * np.mean(d)), "max_ms": float(1000 * np.max(d))}

    return {"soxr_hq_speaker": run(StreamResampler(22_050, RATE), False), "swr_transport": run(Resampler(22_050), True)}


def run_config(label: str, *, server_jitter: int, caller_jitter: int, mute: bool,
               questions: Sequence[str], interruptions: Sequence[str], max_new_tokens: int,
               timeout_s: float) -> dict[str, Any]:
    """One configuration: `rejoinder serve` in a subprocess, one caller (also used by bench/agent_latency.py)."""
    print(f"{label}: server --receive-jitter-packets {server_jitter}, caller jitter buffer {caller_jitter}, "
          f"mute on barge-in {'on' if mute else 'off'}; loading models in `rejoinder serve`…", flush=True)
    extra = ["--max-new-tokens", str(max_new_tokens)]
    (ROOT / "artifacts").mkdir(exist_ok=True)
    with serve_process(receive_jitter_packets=server_jitter, extra=extra,
                       log_path=ROOT / "artifacts" / f"webrtc_latency_{label}_serve.log") as url:
        doc = asyncio.run(measure_webrtc(url, questions=questions, interruptions=interruptions,
                                         caller_jitter_packets=caller_jitter, honour_mute=mute,
                                         timeout_s=timeout_s))
    doc["config"] = {"server_receive_jitter_packets": server_jitter, "caller_jitter_packets": caller_jitter,
                     "caller_honours_mute": mute}
    return doc


def _ms(v: float | None) -> str:
    return "   -  " if v is None else f"{v * 1000:6.0f}"


def print_tables(docs: dict[str, dict]) -> None:
    labels = list(docs)
    print("\nvoice-to-voice as heard, median per stage (ms): " + "  ".join(f"{k:>8s}" for k in labels))
    for n in STAGES:
        print(f"  {n:42s}" + "  ".join(f"{_ms(docs[k]['summary']['v2v_stage_p50_s'][n]):>8s}" for k in labels))
    for key in ("transport_p50_s", "transport_p95_s", "answer_lead_in_p50_s", "heard_v2v_p50_s", "heard_v2v_p95_s",
                "server_v2v_p50_s"):
        print(f"  {key:42s}" + "  ".join(f"{_ms(docs[k]['summary'][key]):>8s}" for k in labels))
    print("barge-in as heard, median per stage (ms):")
    for n in BARGE_STAGES:
        print(f"  {n:42s}" + "  ".join(f"{_ms(docs[k]['summary']['barge_in_stage_p50_s'].get(n)):>8s}"
                                        for k in labels))
    for key in ("barge_in_heard_p50_s", "barge_in_heard_p95_s", "barge_in_unmuted_p95_s", "barge_in_server_p50_s"):
        print(f"  {key:42s}" + "  ".join(f"{_ms(docs[k]['summary'][key]):>8s}" for k in labels))
    print("transport stages, every frame (p50 / p95 ms): server (rtc_stats) and caller")
    for k in labels:
        for who, stages in (("server", docs[k]["server"]["stages"]), ("caller", docs[k]["caller_stages"])):
            cells = "  ".join(f"{n} {s['p50_ms']}/{s['p95_ms']}" for n, s in stages.items() if s["n"])
            print(f"  {k:7s}{who}: {cells}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    labels = list(runs)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    data = [[r["heard_voice_to_voice_s"] for r in runs[k]["turns"] if r.get("heard_voice_to_voice_s") is not None]
            for k in labels]
    ax[0].boxplot(data)
    ax[0].set_xticks(range(1, len(labels) + 1), labels)
    ax[0].axhline(TARGETS["heard_v2v_p50_s"], color="r", ls="--", label="target p50 0.7 s")
    ax[0].set_ylabel("voice-to-voice as heard (s)")
    ax[0].legend()
    bottom = np.zeros(len(labels))
    for n in STAGES:
        if n == "server":
            continue
        v = np.array([1000 * (runs[k]["summary"]["v2v_stage_p50_s"][n] or 0.0) for k in labels])
        ax[1].bar(labels, v, bottom=bottom, label=n)
        bottom += v
    server = ", ".join(f"{k} {runs[k]['summary']['v2v_stage_p50_s']['server']:.2f} s" for k in labels)
    ax[1].set_ylabel("median ms per stage")
    ax[1].set_title(f"voice-to-voice outside the server (server: {server})", fontsize=9)
    ax[1].legend(fontsize=7)
    groups = []
    names = []
    for k in labels:
        muting = runs[k].get("config", {}).get("caller_honours_mute", True)
        for key, tag in (("heard_stop_after_onset_s", "heard (mute)"), ("unmuted_stop_after_onset_s", "no mute")):
            if muting or key == "unmuted_stop_after_onset_s":
                groups.append([r[key] for r in runs[k]["barge_ins"] if r.get(key) is not None])
                names.append(f"{k}\n{tag}")
    ax[2].boxplot(groups)
    ax[2].set_xticks(range(1, len(names) + 1), names, fontsize=8)
    ax[2].axhline(TARGETS["barge_in_heard_p95_s"], color="r", ls="--", label="target p95 0.3 s")
    ax[2].set_ylabel("agent heard after the caller's onset (s)")
    ax[2].legend()
    fig.suptitle(f"bench/webrtc_latency.py: WebRTC caller on loopback ({os.cpu_count()} CPUs, embedded models)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/webrtc_latency.json")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--interruptions", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on each configuration's caller run (s)")
    ap.add_argument("--compare", action="store_true", help="also run the 'before' transport (aiortc's buffers)")
    ap.add_argument("--from-json", action="store_true",
                    help="measure nothing: re-summarise and re-plot the rows already in --json")
    args = ap.parse_args()
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        old = json.loads(path.read_text())
        runs = old["runs"]
        for r in runs.values():
            r["summary"] = summarise(r["turns"], r["barge_ins"])
        doc: dict[str, Any] = {k: v for k, v in old.items() if not k.startswith("ratio_")}
    else:
        what = {"questions": QUESTIONS[: args.questions],
                "interruptions": INTERRUPTIONS[: args.interruptions], "max_new_tokens": args.max_new_tokens,
                "timeout_s": args.timeout}
        runs = {"after": run_config("after", server_jitter=0, caller_jitter=0, mute=True, **what)}
        if args.compare:
            runs["before"] = run_config("before", server_jitter=4, caller_jitter=4, mute=False, **what)
        doc = {"runs": runs, "targets": TARGETS, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    doc["resampling_delay"] = resampling_delay()
    a = runs["after"]["summary"]
    if "before" in runs:
        b = runs["before"]["summary"]

        def ratio(kb: str, ka: str) -> float | None:
            return b[kb] / a[ka] if a[ka] and b[kb] else None

        # The transport's own share is the comparison that means something: the server's part
        # (seconds on a loaded 2-core box) varies more between two runs than the transport's whole.
        doc["ratio_transport_p50_before_over_after"] = ratio("transport_p50_s", "transport_p50_s")
        doc["ratio_heard_v2v_p50_before_over_after"] = ratio("heard_v2v_p50_s", "heard_v2v_p50_s")
        doc["ratio_barge_in_heard_p50_before_unmuted_over_after"] = ratio("barge_in_unmuted_p50_s",
                                                                           "barge_in_heard_p50_s")
        doc["ratio_barge_in_heard_p95_before_unmuted_over_after"] = ratio("barge_in_unmuted_p95_s",
                                                                           "barge_in_heard_p95_s")
    path.write_text(json.dumps(doc, indent=2))
    plot(doc, path.with_suffix(".png"))
    print_tables(runs)
    rd = doc["resampling_delay"]
    print("22.05 kHz -> 48 kHz and 20 ms frames (first sample / mean / max ms; no resampling: 0 / -10 / 0): "
          + "; ".join(f"{k} {v['first_ms']:.0f} / {v['mean_ms']:.0f} / {v['max_ms']:.0f}" for k, v in rd.items()))
    met = {k: (a[k] is not None and a[k] <= v) for k, v in TARGETS.items()}
    print(f"targets: heard v2v p50 <= 0.7 s: {'met' if met['heard_v2v_p50_s'] else 'MISSED'}; "
          f"barge-in heard p95 <= 0.3 s: {'met' if met['barge_in_heard_p95_s'] else 'MISSED'}")
    for k, v in doc.items():
        if k.startswith("ratio_") and v is not None:
            print(f"{k}: {v:.2f}x")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
