"""False and missed barge-ins on a synthetic room, before and after echo cancellation, in one run.

The test set (tests/barge_in_chain.scene_set, all synthesised now and seeded): the agent's answer
(Piper) comes back through a room (tests/echo_scenes: exponentially decaying noise, RT60 0.2-0.4 s)
at delays 20-250 ms and gains -20 to 0 dB; the same rooms with a second voice (espeak-ng, 6 dB
below the agent's level as sent) talking over it; a cough, a door knock, a 150 ms noise burst and
keyboard typing over the echo (how each is made: tests/echo_scenes.py). Each scene runs through
the session's input chain on a virtual clock (tests/barge_in_chain.py: canceller -> echo guard ->
Silero VAD + streaming Whisper -> the session's barge-in decisions), once per variant:

- before: the correlation guard alone (streaming/echo.py), min speech 0.2 s (the old defaults);
- after: WebRTC AEC3 + NS (streaming/aec.py, pywebrtc-audio's build) before the VAD, the echo check
  behind it (the guard on the cleaned input, and the energy the canceller removed), min speech
  lowered; and, to see what each piece is worth, the same without NS, without the echo check, and
  with livekit's rtc build of the module when livekit-agents is installed;
- auto (the default, `--aec auto`): the input passes untouched until the echo-path detector
  (streaming/echo.py `EchoPathDetector`) finds the agent's voice in it, then as "after".

Two more scenes have no echo path at all (a headset): a caller talking over the agent must barge in,
and the auto canceller must never engage there (`aec_engaged_without_echo`).

A false barge-in is any pause of the agent's audio in an echo or noise scene (even one that
resumes when the transcript has no words); a missed one is a second-talker scene where the agent
never paused. Also: echo energy removed (ERLE), the interrupter's words as recognised (WER), the
pause reaction (pause - true onset), and the canceller's cost per 20 ms frame, timed alone.

    python bench/echo_barge_in.py [--json bench/results/echo_barge_in.json] [--quick] [--seed-offset N]
                                  [--variants 'guard only,auto,AEC + NS + echo']
Writes a PNG next to the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from barge_in_chain import BEFORE, NO_ECHO_DB, Scene, SceneResult, Variant, run_scene, scene_set  # noqa: E402
from echo_scenes import RATE, Room  # noqa: E402
from speech import espeak_say, piper_say, piper_voice, shared_whisper  # noqa: E402

from rejoinder.agent.config import TurnTakingConfig  # noqa: E402
from rejoinder.streaming.aec import AECConfig, EchoCanceller  # noqa: E402
from rejoinder.streaming.frames import AudioFrame  # noqa: E402
from rejoinder.streaming.text_metrics import word_error_rate  # noqa: E402


def variants(min_speech: list[float]) -> list[Variant]:
    last = min_speech[-1]
    out = [BEFORE]
    out += [Variant(f"AEC + NS + echo check, {m:.2f} s", aec=True, guard=True, min_speech_s=m) for m in min_speech]
    default_min = TurnTakingConfig().min_speech_s  # the product's defaults: auto, this minimum speech
    for m in sorted({default_min, last}, reverse=True):
        out.append(Variant(f"auto: AEC + NS once the echo is found, {m:.2f} s", aec=True, guard=True,
                           min_speech_s=m, aec_mode="auto"))
    out += [
        Variant(f"AEC (no NS) + echo check, {last:.2f} s", aec=True, guard=True, min_speech_s=last,
                noise_suppression=False),
        Variant(f"AEC + NS, no echo check, {last:.2f} s", aec=True, guard=False, min_speech_s=last),
    ]
    try:  # livekit's build of the same module (with the livekit extra)
        from livekit import rtc  # noqa: F401

        out.append(Variant(f"AEC + NS (livekit) + echo check, {last:.2f} s", aec=True, guard=True, min_speech_s=last,
                           backend="livekit"))
    except ImportError:
        pass
    return out


def summarise(results: list[SceneResult], scenes: list[Scene]) -> dict:
    by = {s.name: s for s in scenes}
    echo = [r for r in results if r.kind == "echo" and by[r.scene].room.drr_db >= 0]
    reverberant = [r for r in results if r.kind == "echo" and by[r.scene].room.drr_db < 0]
    noise = [r for r in results if r.kind == "noise"]
    user = [r for r in results if r.kind == "user"]
    reactions, wers = [], []
    for r in user:
        sc = by[r.scene]
        mine = [c for c in r.candidates if c.onset_s >= sc.near_at_s - 0.2]  # not an echo's earlier
        if mine:
            reactions.append(mine[0].paused_s - sc.near_at_s)
            wers.append(word_error_rate(sc.near_text, mine[0].text))
    erles = [r.erle_db for r in echo if r.erle_db is not None]
    has_echo = [r for r in results if by[r.scene].room.gain_db > NO_ECHO_DB]
    engaged = [r.aec_engaged_s for r in has_echo if r.aec_engaged_s is not None]
    ms = [r.aec_ms_per_block for r in results if r.aec_ms_per_block is not None]
    return {
        "false_barge_ins_echo": sum(r.false_barge_in for r in echo), "echo_scenes": len(echo),
        "false_barge_ins_reverberant": sum(r.false_barge_in for r in reverberant),
        "reverberant_scenes": len(reverberant),
        "false_barge_ins_noise": sum(r.false_barge_in for r in noise), "noise_scenes": len(noise),
        "false_confirmed": sum(any(c.outcome == "interruption" for c in r.candidates) for r in echo + noise),
        "false_confirmed_reverberant": sum(any(c.outcome == "interruption" for c in r.candidates) for r in reverberant),
        "false_turns": sum(r.false_turns for r in echo + noise),
        "missed_barge_ins": sum(not any(c.onset_s >= by[r.scene].near_at_s - 0.2 for c in r.candidates) for r in user),
        "user_scenes": len(user),
        "confirmed_barge_ins": sum(any(c.outcome == "interruption" for c in r.candidates) for r in user),
        "echo_suppressed_by_guard": sum(r.echo_suppressed for r in results),
        "reaction_s_median": float(np.median(reactions)) if reactions else None,
        "interrupter_wer_median": float(np.median(wers)) if wers else None,
        "erle_db_median": float(np.median(erles)) if erles else None,
        "erle_db_min": float(np.min(erles)) if erles else None,
        "aec_ms_per_10ms_in_chain": float(np.median(ms)) if ms else None,
        # auto: in how many scenes with an echo the canceller engaged, how soon; and where there was none
        "aec_engaged_with_echo": len(engaged), "scenes_with_echo": len(has_echo),
        "aec_engaged_s_median": float(np.median(engaged)) if engaged else None,
        "aec_engaged_s_max": float(np.max(engaged)) if engaged else None,
        "aec_engaged_without_echo": sum(r.aec_engaged_s is not None for r in results
                                        if by[r.scene].room.gain_db <= NO_ECHO_DB),
    }


def time_canceller(backend: str, seconds: float = 6.0) -> float:
    """ms per 20 ms frame (reference + input), best of 3, on speech through a room, nothing else running."""
    tts_rate = piper_voice().config.sample_rate
    far = np.asarray(piper_say("The weather is lovely today and the park is full of people.", rate=tts_rate))
    path = Room(0.12, -6.0).echo_path()
    far16 = np.asarray(piper_say("The weather is lovely today and the park is full of people."))
    path.play(0, far16)
    step = tts_rate // 50
    n = min(int(seconds * 50), far.size // step)
    mics = [path.block(k * 320, 320) for k in range(n)]
    refs = [far[k * step : (k + 1) * step] for k in range(n)]
    best = float("inf")
    for _ in range(3):
        aec = EchoCanceller(AECConfig(mode="on", backend=backend))
        t0 = time.perf_counter()
        for k in range(n):
            t = k * 0.02
            aec.add_reference(AudioFrame.from_float(refs[k], tts_rate, t), t)
            aec.process(AudioFrame(mics[k], RATE, 1, t))
        best = min(best, (time.perf_counter() - t0) / n * 1000)
    return best


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["summary"])
    s = [report["summary"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    x = np.arange(len(names))
    ax = axes[0]
    w = 0.2
    ax.bar(x - 1.5 * w, [v["false_barge_ins_echo"] for v in s], w, label="false (echo)", color="#c44")
    ax.bar(x - 0.5 * w, [v["false_barge_ins_noise"] for v in s], w, label="false (noise over echo)", color="#e90")
    ax.bar(x + 0.5 * w, [v["false_barge_ins_reverberant"] for v in s], w, label="false (echo, DRR -10 dB stress)",
           color="#a6a")
    ax.bar(x + 1.5 * w, [v["missed_barge_ins"] for v in s], w, label="missed (second talker)", color="#48c")
    ax.set_xticks(x, [n.replace(", ", ",\n") for n in names], fontsize=7)
    ax.set_ylabel("scenes")
    ax.set_title(f"barge-in errors ({s[0]['echo_scenes']} echo, {s[0]['noise_scenes']} noise, "
                 f"{s[0]['reverberant_scenes']} stress, {s[0]['user_scenes']} talker scenes)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    after = next((n for n in names if "AEC + NS + echo check" in n), names[-1])
    grid = {}
    for r in report["results"][after]:
        if r["kind"] == "echo" and r["erle_db"] is not None:
            if "DRR" in r["scene"]:
                continue
            d, g = r["scene"].split()[1], r["scene"].split()[3]
            grid[(int(d), float(g))] = r["erle_db"]
    ds = sorted({k[0] for k in grid})
    gs = sorted({k[1] for k in grid}, reverse=True)
    img = np.array([[grid.get((d, g), np.nan) for d in ds] for g in gs])
    im = ax.imshow(img, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ds)), [f"{d} ms" for d in ds])
    ax.set_yticks(range(len(gs)), [f"{g:+.0f} dB" for g in gs])
    for i in range(len(gs)):
        for j in range(len(ds)):
            ax.text(j, i, f"{img[i, j]:.0f}", ha="center", va="center", color="w", fontsize=9)
    fig.colorbar(im, ax=ax, label="ERLE (dB)")
    ax.set_title(f"echo removed, {after}")
    ax = axes[2]
    probe = next((n for n in names if "no echo check" in n), after)  # every start recorded, none acted on
    for label, kinds, color in (("the agent's echo (VAD fired on what AEC left)", ("echo", "noise"), "#c44"),
                                ("second talker", ("user",), "#48c")):
        pts = [(st["guard"], st["local_erle_db"]) for r in report["results"][probe] if r["kind"] in kinds
               for st in r["starts"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"{label} (n={len(pts)})", color=color, s=22)
    ax.axvline(report["guard_cleaned_threshold"], color="k", ls="--", lw=1, label="guard threshold (cleaned input)")
    ax.axhline(report["echo_removed_db"], color="k", ls=":", lw=1, label="echo_removed_db")
    ax.set_xlabel("echo guard correlation of the cleaned input at a speech start")
    ax.set_ylabel("energy the canceller removed around the onset (dB)")
    ax.legend(fontsize=7)
    ax.set_title(f"speech starts while the agent spoke ({probe})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench/results/echo_barge_in.json")
    ap.add_argument("--quick", action="store_true", help="a third of the scenes")
    ap.add_argument("--min-speech", default="0.12,0.15", help="the lowered minimum speech values (s), comma-separated")
    ap.add_argument("--seed-offset", type=int, default=0, help="another draw of rooms and noises (held-out check)")
    ap.add_argument("--variants", default="", help="only the variants whose name holds one of these comma-separated "
                    "words (e.g. 'guard only,auto,AEC + NS + echo'); default: all")
    args = ap.parse_args()
    tts_rate = piper_voice().config.sample_rate
    scenes = scene_set(lambda t: piper_say(t, rate=tts_rate), espeak_say, tts_rate, quick=args.quick,
                       seed_offset=args.seed_offset)
    asr = shared_whisper()
    min_speech = [float(v) for v in args.min_speech.split(",")]
    vs = variants(min_speech)
    if args.variants:
        keep = [w.strip() for w in args.variants.split(",") if w.strip()]
        vs = [v for v in vs if any(w in v.name for w in keep)]
    results: dict[str, list[SceneResult]] = {v.name: [] for v in vs}
    t_start = time.perf_counter()
    for sc in scenes:
        for v in vs:
            r = await run_scene(sc, v, asr)
            results[v.name].append(r)
            marks = " ".join(f"{c.outcome}:{c.text!r}" for c in r.candidates) or "-"
            print(f"{sc.name:36s} | {v.name:34s} | {marks}", flush=True)
    from rejoinder.streaming.echo import EchoGuardConfig

    report = {
        "scenes": len(scenes), "seed_offset": args.seed_offset, "min_speech_s": min_speech,
        "guard_cleaned_threshold": EchoGuardConfig().cleaned_threshold,
        "echo_removed_db": AECConfig().echo_removed_db,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "summary": {name: summarise(rs, scenes) for name, rs in results.items()},
        "canceller_ms_per_20ms_frame": {b: round(time_canceller(b), 3) for b in
                                        sorted({v.backend for v in vs if v.aec})},
        "results": {name: [r.to_dict() for r in rs] for name, rs in results.items()},
    }
    print()
    cols = ("false_barge_ins_echo", "false_barge_ins_noise", "false_barge_ins_reverberant", "false_turns",
            "missed_barge_ins",
            "confirmed_barge_ins", "reaction_s_median", "interrupter_wer_median", "erle_db_median",
            "aec_engaged_with_echo", "aec_engaged_without_echo", "aec_engaged_s_median")
    print(f"{'variant':38s} " + " ".join(f"{c[:14]:>14s}" for c in cols))
    for name, s in report["summary"].items():
        cells = [s[c] if not isinstance(s[c], float) else round(s[c], 2) for c in cols]
        print(f"{name:38s} " + " ".join(f"{'-' if v is None else v!s:>14s}" for v in cells))
    print("canceller cost, ms per 20 ms frame (timed alone):", report["canceller_ms_per_20ms_frame"])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    asyncio.run(main())
