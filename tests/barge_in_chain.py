"""The session's input chain on a virtual clock: AEC -> echo guard -> VAD/listener -> barge-in decision.

A scene is the agent speaking (Piper) into a synthetic room (`echo_scenes.Room`), maybe with a
second voice or a noise on top. `run_scene` plays it through the same components the session wires
(`streaming.aec.EchoCanceller`, `streaming.echo.EchoGuard`, `streaming.listener.Listener` with the
session's VAD settings) and takes the session's decisions (agent.session `_on_vad`,
agent.barge_in `is_echo` / `resolve`): speech that starts while the agent speaks (or within
ECHO_TAIL_S of its last frame) is echo when the guard's correlation or the canceller's removed
energy says so, else a barge-in
candidate; the agent's audio pauses at once (so its echo stops a delay later, as in a room); the
candidate's final transcript confirms it or resumes the answer (no words: noise; backchannel; the
agent's own words). Time is virtual (20 ms a step; while a candidate waits for its transcript the
ASR is waited for at every step), so a scene runs faster than real time and decides the same on a
loaded machine. tests/test_echo_barge_in.py
also runs the real Session on a real clock, end to end.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from echo_scenes import RATE, Room

from rejoinder.agent.barge_in import ECHO_TAIL_S, is_backchannel, is_echo_text, words
from rejoinder.agent.config import TurnTakingConfig
from rejoinder.streaming.aec import AECConfig, EchoCanceller
from rejoinder.streaming.asr_stream import ASREvent, StreamingASRConfig
from rejoinder.streaming.audio import resample
from rejoinder.streaming.echo import EchoGuard, EchoGuardConfig
from rejoinder.streaming.frames import AudioFrame
from rejoinder.streaming.listener import Listener
from rejoinder.streaming.vad import SileroVAD, VADConfig

FRAME = RATE // 50
T0 = 1000.0  # virtual monotonic time of the scene's first sample
AGENT_START_S = 0.3


@dataclass(frozen=True)
class Variant:
    name: str
    aec: bool
    guard: bool
    min_speech_s: float
    backend: str = "pywebrtc"  # streaming.aec.BACKENDS
    noise_suppression: bool = True
    aec_mode: str = "on"  # with aec: "on" (from the first frame) or "auto" (once the echo is found)


BEFORE = Variant("guard only, min speech 0.2 s", aec=False, guard=True, min_speech_s=0.2)


@dataclass(frozen=True)
class Scene:
    name: str
    kind: Literal["echo", "noise", "user"]
    room: Room
    agent_text: str
    agent_audio: np.ndarray  # the agent's answer at the TTS rate (Piper), as the playout sends it
    tts_rate: int
    near: np.ndarray | None = None  # the near-end sound (16 kHz), trimmed
    near_at_s: float = 1.6  # where it starts, in scene time
    near_text: str = ""  # a second talker's words


@dataclass
class Candidate:
    onset_s: float  # scene time of the first speech window
    paused_s: float  # scene time the agent's audio stopped
    text: str = ""
    outcome: str = "pending"  # interruption / noise / backchannel / echo


@dataclass
class SceneResult:
    scene: str
    kind: str
    variant: str
    candidates: list[Candidate] = field(default_factory=list)
    echo_suppressed: int = 0  # speech starts the guard called echo
    false_turns: int = 0  # speech accepted as a new user turn right after the agent stopped (echo tail)
    erle_db: float | None = None  # echo energy removed over the agent's speech (AEC variants)
    starts: list[dict] = field(default_factory=list)  # every speech start while the agent spoke: the evidence
    aec_ms_per_block: float | None = None
    aec_engaged_s: float | None = None  # auto: seconds after the agent began that the canceller engaged

    @property
    def false_barge_in(self) -> bool:
        """The agent paused (or was cut off) for something that is not the user talking."""
        return self.kind != "user" and bool(self.candidates)

    @property
    def barged_in(self) -> bool:
        return any(c.outcome in ("interruption", "pending") for c in self.candidates)

    @property
    def missed(self) -> bool:
        return self.kind == "user" and not self.candidates

    def to_dict(self) -> dict:
        return {"scene": self.scene, "kind": self.kind, "variant": self.variant,
                "candidates": [c.__dict__ for c in self.candidates], "echo_suppressed": self.echo_suppressed,
                "false_turns": self.false_turns, "starts": self.starts, "false_barge_in": self.false_barge_in,
                "missed": self.missed,
                "erle_db": self.erle_db, "aec_ms_per_block": self.aec_ms_per_block,
                "aec_engaged_s": self.aec_engaged_s}


def frames_of(audio_tts: np.ndarray, tts_rate: int) -> list[np.ndarray]:
    """The agent's answer as the playout sends it: 20 ms frames at the TTS rate."""
    n = tts_rate // 50
    x = np.asarray(audio_tts, np.float32)
    x = np.concatenate([x, np.zeros(-x.size % n, np.float32)])
    return [x[i : i + n] for i in range(0, x.size, n)]


async def run_scene(scene: Scene, variant: Variant, asr, vad_path=None, *, tail_s: float = 2.0) -> SceneResult:
    turn_cfg = TurnTakingConfig(min_speech_s=variant.min_speech_s)
    vad_cfg = VADConfig(threshold=turn_cfg.vad_threshold, min_speech_s=turn_cfg.min_speech_s,
                        hangover_s=turn_cfg.hangover_s)
    listener = Listener(asr, vad=SileroVAD(vad_path), vad_config=vad_cfg,
                        asr_config=StreamingASRConfig(final_reuse_margin_s=0.08))
    guard_cfg = EchoGuardConfig()
    guard = EchoGuard(guard_cfg, cleaned=variant.aec and variant.aec_mode == "on")
    raw_guard = EchoGuard(guard_cfg)  # diagnostics: the guard on the input before the canceller
    energy: list[tuple[float, float]] = []  # per frame: raw and cleaned energy
    aec = EchoCanceller(AECConfig(mode=variant.aec_mode, backend=variant.backend,
                                  noise_suppression=variant.noise_suppression)) if variant.aec else None
    result = SceneResult(scene.name, scene.kind, variant.name)
    room = scene.room
    path = room.echo_path()
    rng = np.random.default_rng(room.seed + 7)
    tts_rate = scene.tts_rate
    far = frames_of(scene.agent_audio, tts_rate)
    # What the loudspeaker plays, at 16 kHz: the whole answer resampled at once (a room is linear;
    # frame j of the answer is samples [320 j, 320 j + 320) of it).
    far16 = resample(np.concatenate(far), tts_rate, RATE) if tts_rate != RATE else np.concatenate(far)
    far16 = np.concatenate([far16, np.zeros(max(0, len(far) * FRAME - far16.size), np.float32)])
    played, playing, stopped = 0, False, False  # frames of the answer sent; is the playout running
    last_frame_at = 0.0
    candidate: tuple[int, Candidate] | None = None
    uid = 0
    ignored: set[int] = set()
    pre_roll = listener.detector.config.pre_roll_s
    n_near = scene.near.size if scene.near is not None else 0
    near_a = int(scene.near_at_s * RATE)
    raw_echo_e = clean_e = 0.0
    k = 0
    end_k = int((AGENT_START_S + len(far) * 0.02 + tail_s) * 50)
    try:
        while k < end_k or listener.detector.in_speech or candidate is not None:
            if k > end_k + 500:
                break
            t = T0 + k * 0.02
            a = k * FRAME
            if not playing and not stopped and candidate is None and played < len(far) and k * 0.02 >= AGENT_START_S:
                playing = True
            if playing:
                frame = far[played]
                played += 1
                last_frame_at = t
                ref = AudioFrame.from_float(frame, tts_rate, t)
                guard.add_reference(ref, t)
                raw_guard.add_reference(ref, t)
                if aec is not None:
                    aec.add_reference(ref, t)
                path.play(a, far16[(played - 1) * FRAME : played * FRAME])
                if played >= len(far):
                    playing, stopped = False, True
            echo = path.block(a, FRAME)
            x = echo + room.mic_noise(FRAME, rng)
            if n_near and near_a < a + FRAME and a < near_a + n_near:
                lo, hi = max(a, near_a), min(a + FRAME, near_a + n_near)
                x[lo - a : hi - a] += scene.near[lo - near_a : hi - near_a]
            f = AudioFrame(np.clip(x, -1, 1).astype(np.float32), RATE, 1, t)
            engaged = aec is not None and aec.engaged
            if aec is not None:
                f = aec.process(f)
            if echo.any() and (not n_near or not (near_a - FRAME < a < near_a + n_near)):
                raw_echo_e += float(np.sum(x.astype(np.float64) ** 2))
                clean_e += float(np.sum(f.to_float_mono().astype(np.float64) ** 2))
            guard.add_input(f)
            raw_guard.add_input(AudioFrame(np.clip(x, -1, 1).astype(np.float32), RATE, 1, t))
            energy.append((float(np.sum(np.square(x, dtype=np.float64))),
                           float(np.sum(np.square(f.to_float_mono(), dtype=np.float64)))))
            now = t + 0.02
            for ev in await listener.push(f):
                if ev.kind != "speech_start":
                    continue
                uid += 1
                onset = ev.captured_at + pre_roll
                if not (playing or now - last_frame_at < ECHO_TAIL_S):  # as BargeInHandler.is_echo
                    continue
                w0 = max(onset - 0.05, now - 0.6)
                i0 = max(0, int((w0 - T0) * 50))
                e_raw = sum(e[0] for e in energy[i0:]) + 1e-12
                e_clean = sum(e[1] for e in energy[i0:]) + 1e-12
                result.starts.append({"onset_s": round(onset - T0, 3), "guard": round(guard.score(w0, now), 3),
                                      "guard_raw": round(raw_guard.score(w0, now), 3),
                                      "local_erle_db": round(float(10 * np.log10(e_raw / e_clean)), 1)})
                if variant.guard:  # the session's echo decision (BargeInHandler.is_echo)
                    if aec is not None and not aec.engaged and aec.echo_path != "absent":
                        echo = aec.check(w0, now)
                    else:
                        cleaned = aec is not None and aec.engaged
                        removed = aec.removed_db(w0, now) if cleaned else 0.0
                        echo = guard.score(w0, now) >= guard.threshold or (
                            cleaned and removed >= aec.config.echo_removed_db)
                    if echo:
                        result.echo_suppressed += 1
                        ignored.add(uid)
                        continue
                if candidate is not None:
                    candidate[1].outcome = "interruption"  # more speech: the user has the floor
                    candidate, stopped = None, True
                if playing:
                    c = Candidate(onset - T0, now - T0)
                    result.candidates.append(c)
                    candidate = (uid, c)
                    playing = False
                elif stopped and scene.kind != "user":
                    result.false_turns += 1
            if aec is not None and aec.engaged and not engaged:  # as Session._canceller_engaged
                guard.cleaned = True
                if listener.detector.in_speech and uid in ignored:
                    listener.cut()
            if candidate is not None:
                await listener.settle()  # the candidate's transcript decides it: wait for it in lockstep
            else:
                await asyncio.sleep(0)
            while (ev := listener.get_nowait()) is not None:
                if not isinstance(ev, ASREvent) or ev.kind != "final" or ev.utterance_id in ignored:
                    continue
                if candidate is not None and ev.utterance_id == candidate[0]:
                    c = candidate[1]
                    c.text = ev.text.strip()
                    if not words(c.text):
                        c.outcome = "noise"
                    elif is_backchannel(c.text, turn_cfg.backchannel_max_words):
                        c.outcome = "backchannel"
                    elif is_echo_text(c.text, scene.agent_text, turn_cfg.echo_text_overlap):
                        c.outcome = "echo"
                    else:
                        c.outcome = "interruption"
                        stopped = True
                    candidate = None
                    if not stopped and played < len(far):
                        playing = True  # a false interruption: the answer resumes
            k += 1
    finally:
        await listener.abort()
    if aec is not None:
        if raw_echo_e > 0:
            result.erle_db = round(10 * np.log10(raw_echo_e / max(clean_e, 1e-12)), 1)
        result.aec_ms_per_block = round(aec.stats.ms_per_block, 3)
        if aec.engaged_at is not None:
            result.aec_engaged_s = round(aec.engaged_at - T0 - AGENT_START_S, 3)
    return result


# --- the test set -------------------------------------------------------------------------------------

ECHO_DELAYS_S = (0.02, 0.06, 0.12, 0.25)
ECHO_GAINS_DB = (0.0, -6.0, -12.0, -20.0)
RT60S = (0.2, 0.3, 0.4)
USER_LEVEL_DB = -6.0  # the second talker's level against the agent's voice as sent
NO_ECHO_DB = -200.0  # an echo gain that leaves nothing: a caller with no echo path


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def scene_set(agent_say, user_say, tts_rate: int, *, quick: bool = False, seed_offset: int = 0) -> list[Scene]:
    """The echo / noise / second-talker scenes (seeded). `agent_say(text)` gives Piper audio at
    `tts_rate`, `user_say(text)` espeak-ng audio at 16 kHz (tests/speech.py). Another
    `seed_offset` draws other rooms and noises (and other RT60s) for the same grid."""
    from echo_scenes import NOISES
    from speech import SENTENCES, trim

    answers = [" ".join(SENTENCES[i : i + 2]) for i in (0, 2, 6)]
    audio = {t: np.asarray(agent_say(t), np.float32) for t in answers}
    level = {t: _rms(trim(a)) for t, a in audio.items()}
    scenes: list[Scene] = []
    delays = ECHO_DELAYS_S if not quick else (0.02, 0.25)
    gains = ECHO_GAINS_DB if not quick else (0.0, -12.0)
    i = 0
    for d in delays:
        for g in gains:
            text = answers[i % len(answers)]
            room = Room(d, g, RT60S[(i + seed_offset) % len(RT60S)], seed=i + seed_offset)
            scenes.append(Scene(f"echo {int(d * 1000)} ms {g:+.0f} dB", "echo", room, text, audio[text], tts_rate))
            i += 1
    if not quick:  # a stress row: the echo mostly diffuse reverberation (loudspeaker across a live room)
        for d, g in ((0.06, 0.0), (0.25, 0.0), (0.06, -12.0), (0.25, -12.0)):
            text = answers[i % len(answers)]
            room = Room(d, g, 0.4, seed=i + seed_offset, drr_db=-10.0)
            scenes.append(Scene(f"echo {int(d * 1000)} ms {g:+.0f} dB DRR -10", "echo", room, text, audio[text],
                                tts_rate))
            i += 1
    noise_rooms = (Room(0.06, -6.0, 0.3, seed=40 + seed_offset), Room(0.25, 0.0, 0.4, seed=41 + seed_offset))
    for j, (name, make) in enumerate(NOISES.items()):
        for room in noise_rooms[: 1 if quick else 2]:
            text = answers[j % len(answers)]
            scenes.append(Scene(f"{name}, echo {int(room.delay_s * 1000)} ms {room.gain_db:+.0f} dB", "noise", room,
                                text, audio[text], tts_rate, make(seed=room.seed + j), near_at_s=1.6))
    user_rooms = [Room(d, g, RT60S[(k + seed_offset) % 3], seed=60 + k + seed_offset) for k, (d, g) in enumerate(
        [(0.02, 0.0), (0.06, -12.0), (0.12, -6.0), (0.25, 0.0), (0.02, -20.0), (0.06, -6.0), (0.12, 0.0),
         (0.25, -12.0)])]
    for k, room in enumerate(user_rooms[: 3 if quick else 8]):
        text = answers[k % len(answers)]
        said = SENTENCES[(4, 5, 8, 9, 10, 11)[k % 6]]  # never words of an answer
        near = trim(np.asarray(user_say(said), np.float32))
        near = near * (level[text] * 10 ** (USER_LEVEL_DB / 20) / max(_rms(near), 1e-9))
        scenes.append(Scene(f"user over echo {int(room.delay_s * 1000)} ms {room.gain_db:+.0f} dB", "user", room,
                            text, audio[text], tts_rate, near.astype(np.float32), near_at_s=1.6, near_text=said))
    if not quick:  # no echo path at all (a headset; a browser that cancelled its own echo)
        for k, said in enumerate((SENTENCES[4], "Stop, what is two plus two?")):
            text = answers[k % len(answers)]
            near = trim(np.asarray(user_say(said), np.float32))
            near = near * (level[text] * 10 ** (USER_LEVEL_DB / 20) / max(_rms(near), 1e-9))
            scenes.append(Scene(f"user, no echo (headset) {k}", "user", Room(0.06, NO_ECHO_DB, 0.3, seed=90 + k),
                                text, audio[text], tts_rate, near.astype(np.float32), near_at_s=1.6 + k,
                                near_text=said))
    if not quick:  # short interruptions, quieter (9 dB below the agent), later into the answer
        for k, (said, d, g, at) in enumerate(SHORT_INTERRUPTIONS):
            text = answers[k % len(answers)]
            room = Room(d, g, RT60S[(k + seed_offset) % 3], seed=80 + k + seed_offset)
            near = trim(np.asarray(user_say(said), np.float32))
            near = near * (level[text] * 10 ** ((USER_LEVEL_DB - 3.0) / 20) / max(_rms(near), 1e-9))
            scenes.append(Scene(f"short interruption {int(d * 1000)} ms {g:+.0f} dB", "user", room, text,
                                audio[text], tts_rate, near.astype(np.float32), near_at_s=at, near_text=said))
    return scenes


SHORT_INTERRUPTIONS = (
    ("Stop, what is two plus two?", 0.12, -6.0, 3.0),
    ("Hold on, stop please.", 0.06, 0.0, 4.0),
    ("No, tell me about rivers instead.", 0.25, -6.0, 3.5),
    ("Sorry, what time is it?", 0.02, -12.0, 4.0),
)
