"""The web client in a real browser: headless Chromium, a fake microphone, the real agent.

Chromium is driven over the DevTools protocol (a websocket, with aiohttp: no extra dependency, no
browser download). Its microphone is a WAV synthesised at test time; everything the test checks is
read back through the page itself (its DOM and the state it exposes as `window.rejoinder`), so it
checks what a person would see: their words, the agent's reply, the latency read-out, audio that
actually arrived (WebRTC getStats), the messages shown when things go wrong, and the agent's voice
silenced the moment the session pauses it for a barge-in (and playing again for what follows).

A screenshot of the conversation is saved to artifacts/web_chromium.png.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from speech import piper_say, trim
from webrtc_server import EchoSession, ServerThread, shared_agent

from rejoinder.agent.serving import agent_session_factory
from rejoinder.streaming.audio import resample, write_wav
from rejoinder.streaming.signalling import ServeConfig
from rejoinder.streaming.text_metrics import normalized_words, word_error_rate

# DESIGN.md, "Network in tests": Chromium gathers loopback candidates only with this flag, and the
# script below (run in every page before its own code) keeps every other address out of the offer,
# so the server (which offers 127.0.0.1 alone) and the browser meet on the loopback.
LOOPBACK_ONLY_JS = r"""
(() => {
  const Native = window.RTCPeerConnection;
  const loopback = (sdp) => sdp.split('\r\n').filter(
    (l) => !l.startsWith('a=candidate:') || l.split(' ')[4] === '127.0.0.1').join('\r\n');
  const local = Object.getOwnPropertyDescriptor(Native.prototype, 'localDescription');
  Object.defineProperty(Native.prototype, 'localDescription', {
    get() {
      const d = local.get.call(this);
      return d && new RTCSessionDescription({ type: d.type, sdp: loopback(d.sdp) });
    },
  });
  window.__peerConnections = [];
  window.RTCPeerConnection = function (...args) {
    const pc = new Native(...args);
    window.__peerConnections.push(pc);
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
})();
"""
SELECTED_PAIR_JS = """(async () => {
  const pc = window.__peerConnections[window.__peerConnections.length - 1];
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((r) => {
    if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
  });
  if (!pair) return null;
  const l = stats.get(pair.localCandidateId), r = stats.get(pair.remoteCandidateId);
  return [l.address || l.ip, r.address || r.ip];
})()"""

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


class CDP:
    """A minimal DevTools protocol client for one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def eval(self, expression: str, *, gesture: bool = False) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                            userGesture=gesture)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a page expression until it is truthy; fail with `what` and the page's state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        state = await self.eval("JSON.stringify(window.rejoinder && window.rejoinder.view)")
        pytest.fail(f"timed out waiting for {what}; page state: {state}")

    def exceptions(self) -> list[str]:
        return [e["params"]["exceptionDetails"].get("text", "") + " " +
                str(e["params"]["exceptionDetails"].get("exception", {}).get("description", ""))
                for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


class Browser:
    """Headless Chromium with a fake microphone playing `wav`; `page(url)` opens a CDP session."""

    def __init__(self, wav: Path | None, *, grant_mic: bool = True) -> None:
        self.wav = wav
        self.grant_mic = grant_mic
        self.profile = tempfile.mkdtemp(prefix="rejoinder-chromium-")
        self.proc: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None
        self.port = 0
        self.cdp: CDP | None = None

    async def __aenter__(self) -> Browser:
        args = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--mute-audio", "--window-size=1280,860",
            "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
            "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
        ]
        if self.grant_mic:
            args.append("--use-fake-ui-for-media-stream")  # auto-accept the permission prompt
        if self.wav is not None:
            args.append(f"--use-file-for-fake-audio-capture={self.wav}%noloop")
        self.proc = subprocess.Popen([*args, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Chromium did not start (no DevToolsActivePort)")
            await asyncio.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        return self

    async def page(self, url: str) -> CDP:
        async with self.http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            targets = [t for t in await r.json() if t["type"] == "page"]
        ws = await self.http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        cdp = self.cdp = CDP(ws)
        await cdp.send("Runtime.enable")
        await cdp.send("Page.enable")
        await cdp.send("Page.addScriptToEvaluateOnNewDocument", source=LOOPBACK_ONLY_JS)
        # A fixed viewport, so screenshots are comparable from run to run.
        await cdp.send("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False)
        if not self.grant_mic:
            # As if the person clicked "Block" on the microphone prompt.
            origin = url.rstrip("/")
            await cdp.send("Browser.setPermission", permission={"name": "microphone"}, setting="denied", origin=origin)
        await cdp.send("Page.navigate", url=url)
        await cdp.wait_for("document.readyState === 'complete' && !!window.rejoinder", 20, "the page to load")
        return cdp

    async def screenshot(self, path: Path) -> None:
        assert self.cdp is not None
        shot = await self.cdp.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def __aexit__(self, *exc: object) -> None:
        if self.cdp is not None:
            await self.cdp.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def fake_mic_wav(path: Path, text: str, lead_s: float, tail_s: float = 30.0) -> Path:
    """The fake microphone: silence while the call connects and the agent greets, the question, silence."""
    speech = 0.5 * trim(piper_say(text))  # a normal microphone level: the browser's gain control has headroom
    audio = np.concatenate([np.zeros(int(lead_s * 16_000), np.float32), speech,
                            np.zeros(int(tail_s * 16_000), np.float32)])
    write_wav(path, resample(audio, 16_000, 48_000), 48_000)
    return path


VIEW = "window.rejoinder.view"
QUESTION = "What is the capital of France?"


@pytest.mark.slow
async def test_page_talks_to_the_agent_in_chromium(tmp_path):
    models, cfg = shared_agent()
    srv = ServerThread(ServeConfig(max_sessions=1, connect_timeout_s=15.0, media_timeout_s=10.0),
                       agent_session_factory(models, cfg)).start()
    # The question starts 7 s after the microphone opens: after the connection and the greeting.
    wav = fake_mic_wav(tmp_path / "mic.wav", QUESTION, lead_s=7.0)
    try:
        async with Browser(wav) as browser:
            page = await browser.page(srv.url + "/")
            assert (await page.eval("document.title")).startswith("Rejoinder")
            assert await page.eval("document.getElementById('connect-label').textContent") == "Start talking"
            assert await page.eval("document.getElementById('status').dataset.state") == "idle"

            await page.eval("document.getElementById('connect').click()", gesture=True)
            await page.wait_for(f"{VIEW}.phase === 'live'", 30, "the call to connect")
            assert await page.eval("document.getElementById('connect-label').textContent") == "Hang up"
            assert srv.active() == 1
            # The media path is loopback to loopback, on the browser's side as on the server's.
            pair = await page.wait_for(SELECTED_PAIR_JS, 10, "a selected ICE candidate pair")
            assert pair == ["127.0.0.1", "127.0.0.1"], pair

            user = await page.wait_for(
                "(window.rejoinder.transcript.find(e => e.role === 'user' && e.final) || {}).text", 90,
                "the user's words in the transcript")
            # Chromium's own processing (echo cancellation, noise suppression, gain) sits between
            # the file and the agent, so recognition is held to "clearly the question", not verbatim.
            assert "capital" in normalized_words(user) and word_error_rate(QUESTION, user) <= 0.4, user
            reply = await page.wait_for(
                "(() => { const t = window.rejoinder.transcript;"
                " const u = t.findIndex(e => e.role === 'user' && e.final);"
                " const a = t.slice(u + 1).find(e => e.role === 'agent' && e.final && e.latencyMs !== null);"
                " return a && a.text; })()", 120, "the agent's reply with its latency")
            assert len(normalized_words(reply)) >= 2, reply

            # Through the page's own eyes: the bubbles, interim vs final styling, the latency read-out.
            dom = await page.eval("""(() => ({
                user: [...document.querySelectorAll('.msg.user.final .text')].map(e => e.textContent),
                agent: [...document.querySelectorAll('.msg.agent.final .text')].map(e => e.textContent),
                interim: document.querySelectorAll('.msg.interim').length,
                chip: (document.querySelector('.msg.agent .latency-chip') || {}).textContent,
                last: document.getElementById('lat-last').textContent,
                turns: document.getElementById('lat-turns').textContent,
                status: document.getElementById('status-text').textContent,
                error: document.getElementById('banner').hidden ? null
                    : document.getElementById('banner-text').textContent,
            }))()""")
            assert user in dom["user"] and reply in dom["agent"]
            assert dom["chip"] and dom["chip"].endswith(" ms") and dom["last"].endswith(" ms"), dom
            assert int(dom["turns"]) >= 1 and dom["error"] is None, dom

            # Audio really arrived and was not silence: the browser's own WebRTC statistics.
            await asyncio.sleep(1.0)
            stats = await page.eval(f"{VIEW}.stats")
            assert stats["inboundAudioBytes"] > 20_000, stats
            assert stats["inboundAudioEnergy"] > 0.01, stats
            assert stats["outboundAudioBytes"] > 20_000, stats
            # What the browser's own receive path adds (its adaptive jitter buffer, NetEq): the part
            # of "as heard" the aiortc test caller, which plays frames on arrival, does not have.
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "web_chromium_stats.json").write_text(json.dumps(stats, indent=2))

            await page.eval("document.querySelector('.transcript').scrollTop = 0")
            await browser.screenshot(ARTIFACTS / "web_chromium.png")
            assert not page.exceptions(), page.exceptions()

            # Mute, then hang up: the server's slot is freed at once (DELETE), not at a timeout.
            await page.eval("document.getElementById('mute').click()", gesture=True)
            assert await page.eval(f"{VIEW}.muted") is True
            assert await page.eval("document.getElementById('mute').getAttribute('aria-pressed')") == "true"
            await page.eval("document.getElementById('connect').click()", gesture=True)
            assert await page.eval(f"{VIEW}.phase") == "ended"
            t0 = time.monotonic()
            while srv.active() and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.1)
            assert srv.active() == 0
    finally:
        srv.stop()


async def test_page_explains_refused_microphone_unreachable_server_and_token(tmp_path):
    srv = ServerThread(ServeConfig(token="letmein", connect_timeout_s=5.0), EchoSession).start()
    try:
        async with Browser(None, grant_mic=False) as browser:
            page = await browser.page(srv.url + "/")
            # The server wants a token: the page says so up front by opening the settings.
            assert await page.eval("!document.getElementById('settings').hidden") is True
            await page.eval("document.getElementById('connect').click()", gesture=True)
            msg = await page.wait_for(f"{VIEW}.error", 15, "the refused-microphone message")
            assert "Microphone access was refused" in msg
            assert await page.eval(f"{VIEW}.phase") == "idle"
            assert srv.active() == 0
            # Interim text must look provisional and change look when final (computed styles, as rendered).
            looks = await page.eval("""(async () => {
                const { Transcript } = await import('./transcript.js');
                const list = document.createElement('ol');
                list.className = 'transcript';
                document.querySelector('.chat').append(list);
                const t = new Transcript(list, null);
                const style = () => {
                    const el = list.querySelector('.msg.user .text');
                    const s = getComputedStyle(el);
                    return { font: s.fontStyle, color: s.color, after: getComputedStyle(el, '::after').content };
                };
                t.userText(7, 'what is the cap', false);
                const interim = style();
                t.userText(7, 'What is the capital of France?', true);
                const final = style();
                t.agentText(3, 'The capital of', false, false);
                t.markInterrupted(3);
                const cut = list.querySelector('.msg.agent .tag.cut') !== null;
                list.remove();
                return { interim, final, cut, bubbles: t.entries.length };
            })()""")
            assert looks["interim"]["font"] == "italic" and looks["final"]["font"] == "normal", looks
            assert looks["interim"]["color"] != looks["final"]["color"], looks
            assert looks["interim"]["after"] != "none" and looks["final"]["after"] == "none", looks
            assert looks["cut"] and looks["bubbles"] == 2, looks
        async with Browser(None) as browser:
            page = await browser.page(srv.url + "/")
            await page.eval("document.getElementById('connect').click()", gesture=True)
            msg = await page.wait_for(f"{VIEW}.error", 15, "the missing-token message")
            assert "access token" in msg
            await page.eval("document.getElementById('token').value = 'letmein'")
            await page.eval("document.getElementById('connect').click()", gesture=True)
            await page.wait_for(f"{VIEW}.phase === 'live'", 20, "the call to connect with the token")
            assert await page.eval(f"{VIEW}.error") is None
            await page.eval("document.getElementById('connect').click()", gesture=True)
            srv.stop()
            srv = None
            await page.eval("document.getElementById('connect').click()", gesture=True)
            msg = await page.wait_for(f"{VIEW}.error", 15, "the unreachable-server message")
            assert "Cannot reach the Rejoinder server" in msg
            assert not page.exceptions(), page.exceptions()
    finally:
        if srv is not None:
            srv.stop()


MUTE_ROUND_TRIP_JS = """(async (event, want) => {
  // Ask the server to send `event` on the data channel, and time until the page has the agent's
  // voice in the state `want`: one round trip (page -> server -> page) plus the page's own reaction.
  const v = window.rejoinder.view, audio = document.getElementById('remote-audio');
  const t0 = performance.now();
  if (!window.rejoinder.control('emit', { event })) return { error: 'data channel not open' };
  while (!(v.agentMuted === want && audio.muted === want)) {
    if (performance.now() - t0 > 5000) return { timedOut: true, agentMuted: v.agentMuted, element: audio.muted };
    await new Promise((r) => setTimeout(r, 1));
  }
  const pc = window.__peerConnections[window.__peerConnections.length - 1];
  const tracks = pc.getReceivers().filter((r) => r.track && r.track.kind === 'audio').map((r) => r.track.enabled);
  return { ms: performance.now() - t0, element: audio.muted, trackEnabled: tracks, last: v.agentAudio.at(-1) };
})"""


async def test_page_stops_playing_the_agent_on_barge_in_and_plays_the_next_answer():
    """The page mutes the agent's voice when the session pauses for a barge-in, unmutes for what follows.

    The events are built by the session's own event classes and sent by the server on the real
    data channel; what is checked is the page's audio element and remote track, as rendered.
    """
    from rejoinder.agent.events import AgentSpeech, BargeIn, SessionState, StateChanged

    sid = "s"
    candidate = StateChanged(sid, old=SessionState.SPEAKING, new=SessionState.USER_SPEAKING, reason="barge-in")
    confirmed = BargeIn(sid, turn=1, outcome="interruption", at_s=3.0, onset_at=10.0, stopped_at=10.2, text="stop")
    thinking = StateChanged(sid, old=SessionState.USER_SPEAKING, new=SessionState.THINKING, reason="end of turn")
    next_answer = AgentSpeech(sid, turn=2, started=True)
    noise = BargeIn(sid, turn=2, outcome="noise", at_s=6.0, onset_at=13.0, stopped_at=13.2)
    plain_speech = StateChanged(sid, old=SessionState.LISTENING, new=SessionState.USER_SPEAKING, reason="speech")

    srv = ServerThread(ServeConfig(connect_timeout_s=15.0, media_timeout_s=15.0), EchoSession).start()
    try:
        async with Browser(None) as browser:
            page = await browser.page(srv.url + "/")
            await page.eval("document.getElementById('connect').click()", gesture=True)
            await page.wait_for(f"{VIEW}.phase === 'live' && {VIEW}.events.session_started", 30, "the call")
            assert await page.eval(f"{VIEW}.agentMuted") is False
            assert await page.eval("document.getElementById('remote-audio').muted") is False

            async def send(event, want: bool) -> dict:
                got = await page.eval(f"{MUTE_ROUND_TRIP_JS}({json.dumps(event.to_dict())}, {json.dumps(want)})")
                assert got and "ms" in got, got
                return got

            # Talking over the agent: muted at once, element and remote track both.
            cut = await send(candidate, True)
            assert cut["element"] is True and cut["trackEnabled"] == [False], cut
            assert cut["last"]["reason"] == "state:user_speaking", cut
            # Within one loopback round trip (plus the page's reaction); generous for a loaded box.
            assert cut["ms"] < 1000, cut
            # Confirmed: stays muted; the turn goes on (thinking): plays again for whatever comes.
            await send(confirmed, True)
            assert (await send(thinking, False))["trackEnabled"] == [True]
            # Muted again by the next candidate, and a new answer starting plays.
            await send(candidate, True)
            back = await send(next_answer, False)
            assert back["element"] is False and back["trackEnabled"] == [True], back
            # A false interruption (a cough): the answer resumes, and so does the page.
            await send(candidate, True)
            await send(noise, False)
            # The user speaking when the agent was not talking mutes nothing.
            await page.eval(f"window.rejoinder.control('emit', {{event: {json.dumps(plain_speech.to_dict())}}})")
            await page.wait_for(f"{VIEW}.agentState === 'user_speaking'", 5, "the plain speech state")
            assert await page.eval(f"{VIEW}.agentMuted") is False
            changes = await page.eval(f"{VIEW}.agentAudio.map(c => c.muted)")
            assert changes == [True, False, True, False, True, False], changes
            assert not page.exceptions(), page.exceptions()
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "web_barge_in_mute.json").write_text(json.dumps(
                {"mute_round_trip_ms": cut["ms"], "unmute_round_trip_ms": back["ms"]}, indent=2))
    finally:
        srv.stop()


# A line long enough (several seconds of speech) to type over while the agent says it.
LONG_LINE = ("Before you ask, let me tell you about this service: it runs on one server, it listens while it "
             "talks, and you can interrupt it at any moment, by speaking or by typing.")
TYPED_STATE_JS = """(() => {
  const v = window.rejoinder.view, box = document.getElementById('say-text');
  return {
    box: box.value, disabled: box.disabled, send: document.getElementById('say-send').disabled,
    maxLength: box.maxLength, error: v.typedError, typed: v.typed, agentMuted: v.agentMuted,
    agentAudio: v.agentAudio, energy: v.stats.inboundAudioEnergy || 0, events: v.events,
    shownError: document.getElementById('say-error').hidden ? null : document.getElementById('say-error').textContent,
    users: [...document.querySelectorAll('.msg.user .text')].map(e => e.textContent),
    agents: [...document.querySelectorAll('.msg.agent.final .text')].map(e => e.textContent),
  };
})()"""


async def type_and_enter(page: CDP, text: str) -> None:
    """Type into the page's text box as a person would (focus, keystrokes' text, the Enter key)."""
    await page.eval("document.getElementById('say-text').focus()", gesture=True)
    await page.send("Input.insertText", text=text)
    for kind in ("keyDown", "keyUp"):
        await page.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                        nativeVirtualKeyCode=13)


@pytest.mark.slow
async def test_typed_message_is_a_turn_and_cuts_the_agent_off_in_chromium(tmp_path):
    """The page's text box: a typed question is a user turn like a spoken one, answered aloud.

    Typed while the agent is speaking, it cuts the agent off (on the server, and its voice at once on
    the page); a message the server refuses is explained under the box and given back, not lost.
    """
    from rejoinder.agent.control import COMMANDS

    cap = COMMANDS["user_text"].args["text"].max_len
    models, cfg = shared_agent()
    srv = ServerThread(ServeConfig(max_sessions=1, connect_timeout_s=15.0, media_timeout_s=30.0),
                       agent_session_factory(models, cfg)).start()
    silent = tmp_path / "silence.wav"  # a microphone that hears nothing: every turn here is typed
    write_wav(silent, np.zeros(240 * 48_000, np.float32), 48_000)

    def session_state() -> dict:
        (peer,) = srv.server.peers.values()
        s = peer.session.session
        return {"history": [dict(m) for m in s.conversation.turns],
                "turns": [(t.user_text, t.agent_text, t.interrupted, t.first_audio_sent_at) for t in s.turns]}

    try:
        async with Browser(silent) as browser:
            page = await browser.page(srv.url + "/")
            before = await page.eval(TYPED_STATE_JS)
            # Nothing can be sent before the call; the box takes no more than the server accepts.
            assert before["disabled"] and before["send"], before
            assert before["maxLength"] == cap, before

            await page.eval("document.getElementById('connect').click()", gesture=True)
            await page.wait_for(f"{VIEW}.phase === 'live' && {VIEW}.channelOpen", 30, "the data channel to open")
            assert await page.eval("document.getElementById('say-text').disabled") is False
            # The greeting first; then a long line (the data channel's `say`), to type over.
            await page.wait_for(f"{VIEW}.agentState === 'listening' && {VIEW}.transcript.some("
                                "e => e.role === 'agent' && e.final)", 90, "the greeting to be said")
            assert await page.eval(f"window.rejoinder.control('say', {{text: {json.dumps(LONG_LINE)}}})")
            await page.wait_for(f"{VIEW}.agentState === 'speaking'", 60, "the agent to start the long line")
            await asyncio.sleep(0.8)  # well into it, with its audio playing here
            await type_and_enter(page, QUESTION)
            sent = await page.eval(TYPED_STATE_JS)
            # At once: the box is cleared, the message shown as the user's, the agent's voice silenced.
            assert sent["box"] == "" and sent["users"][-1] == QUESTION, sent
            assert sent["typed"][-1]["text"] == QUESTION, sent
            assert sent["agentMuted"] is True and sent["agentAudio"][-1]["reason"] == "typed", sent

            reply = await page.wait_for(
                "(() => { const t = window.rejoinder.transcript;"
                " const u = t.findIndex(e => e.role === 'user' && e.source === 'text'"
                f" && e.text === {json.dumps(QUESTION)});"
                " const a = u >= 0 && t.slice(u + 1).find(e => e.role === 'agent' && e.final && !e.interrupted);"
                " return a && a.text; })()", 120, "the agent's answer to the typed question")
            assert len(normalized_words(reply)) >= 2, reply
            await asyncio.sleep(1.5)  # the answer's last audio, and a stats poll
            after = await page.eval(TYPED_STATE_JS)
            entries = await page.eval("window.rejoinder.transcript")
            # (b) the page: the user's typed words settled as a final turn, the answer shown after it.
            users = [e for e in entries if e["role"] == "user"]
            assert len(users) == 1, entries
            (typed,) = users
            assert typed["text"] == QUESTION and typed["final"] and not typed["pending"], entries
            assert after["typed"][-1]["status"] == "ok" and reply in after["agents"], after
            assert await page.eval("document.querySelector('.msg.user.typed.final .text').textContent") == QUESTION
            # The long line was cut off, on the server (its bubble says so) and here: silenced at
            # once, and heard again only for the answer (not at "thinking", while it was prepared).
            said = [e for e in entries if e["role"] == "agent" and e["interrupted"]]
            assert said and len(normalized_words(said[0]["text"])) < len(normalized_words(LONG_LINE)), entries
            changes = [(c["muted"], c["reason"]) for c in after["agentAudio"]]
            cut = changes.index((True, "typed"))
            assert changes[cut + 1][0] is False and changes[cut + 1][1] in ("agent_speech:", "state:speaking"), changes

            # (a) the server's session: a user turn with the typed text, in history, answered.
            state = srv.call(session_state)
            assert {"role": "user", "content": QUESTION} in state["history"], state
            (turn,) = state["turns"]
            assert turn[0] == QUESTION and turn[1] and not turn[2], state
            # (c) the answer was spoken: sent by the server and heard by the browser.
            assert turn[3] is not None, state
            assert after["events"].get("agent_speech", 0) >= 5, after["events"]  # greeting, long line, answer
            assert after["energy"] > sent["energy"] + 0.001, (sent["energy"], after["energy"])

            # Refused by the server (longer than its cap; the box's own limit is bypassed here, as a
            # pasted script could): the reason shows under the box, the text comes back, no turn.
            too_long = "x" * (cap + 1)
            await page.eval("(() => { const b = document.getElementById('say-text');"
                            f" b.value = {json.dumps(too_long)}; b.dispatchEvent(new Event('input')); }})()")
            await page.eval("document.getElementById('say-text').focus()", gesture=True)
            for kind in ("keyDown", "keyUp"):
                await page.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                                windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)
            shown = await page.wait_for("document.getElementById('say-error').hidden ? null"
                                        " : document.getElementById('say-error').textContent", 15, "the refusal")
            assert "not sent" in shown and f"longer than {cap} characters" in shown, shown
            refused = await page.eval(TYPED_STATE_JS)
            assert refused["box"] == too_long and refused["typed"][-1]["status"] == "refused", refused["typed"]
            assert refused["users"] == [QUESTION], refused["users"]
            assert len(srv.call(session_state)["turns"]) == 1
            # Blank is not a message: Enter on spaces sends nothing.
            await page.eval("(() => { const b = document.getElementById('say-text'); b.value = '   ';"
                            " b.dispatchEvent(new Event('input')); })()")
            await type_and_enter(page, "")
            assert len(await page.eval(f"{VIEW}.typed")) == 2
            await browser.screenshot(ARTIFACTS / "web_chromium_typed.png")
            assert not page.exceptions(), page.exceptions()
    finally:
        srv.stop()
