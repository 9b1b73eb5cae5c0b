"""The server side of WebRTC tests: `rejoinder serve`'s app in a thread, and a stand-in echo agent.

    srv = ServerThread(ServeConfig(...), EchoSession).start()     # or agent_session_factory(models, cfg)
    client = RTCClient(srv.url)                                    # tests/webrtc_client.py
    srv.call(lambda: srv.server.peers)                             # inspect it on its own loop
    srv.stop()
"""
from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np

LOOPBACK = ("127.0.0.1",)


class ServerThread:
    """`rejoinder serve`'s app on its own event loop in a thread, on a free loopback port.

    Its own loop, as in production, so the test's client and the server do not share a scheduler
    (a stall in one does not distort the other's timestamps); the same process, so both read one
    monotonic clock and the server's event times compare directly with the client's.
    """

    def __init__(self, cfg: Any, factory: Any, **app_options: Any) -> None:
        import dataclasses
        import threading

        self.app_options = app_options  # create_app's routes= and on_refused=
        # Loopback only: the port, and the ICE host candidates the server offers (DESIGN.md,
        # "Network in tests"); a config that names other ICE hosts keeps them (the test asked).
        self.cfg = dataclasses.replace(cfg, host="127.0.0.1", port=_free_port(), ice_hosts=cfg.ice_hosts or LOOPBACK)
        self.factory = factory
        self.url = f"http://127.0.0.1:{self.cfg.port}"
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="rejoinder-test-server", daemon=True)
        self.server = None  # rejoinder.streaming.signalling.Server
        self._runner = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        from rejoinder.streaming.signalling import SERVER_KEY, create_app

        app = create_app(self.cfg, self.factory, **self.app_options)
        self.server = app[SERVER_KEY]
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.cfg.host, self.cfg.port).start()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("test server did not start")
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `fn` on the server's loop (its state is not thread-safe) and return its result."""
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Await `coro` on the server's loop (e.g. starting something the server's sessions use)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def active(self) -> int:
        return self.call(lambda: self.server.active)

    def ended(self) -> list[tuple[str, str]]:
        return self.call(lambda: list(self.server.ended))

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@functools.lru_cache(maxsize=1)
def shared_agent() -> tuple[Any, Any]:
    """(Models, AgentConfig) of the embedded models, loaded once for every WebRTC/browser test."""
    from rejoinder.agent.config import AgentConfig
    from rejoinder.agent.models import Models

    cfg = AgentConfig.from_env({})
    return Models(cfg), cfg


class EchoSession:
    """A stand-in agent for transport tests: it replays each utterance it hears, paced like playout.

    It exercises everything the transport must do for a real session (audio in, 16 kHz audio out
    through the transport's resampler, events before and after the data channel opens, control
    messages) with no language model in the way, so a transport fault cannot hide behind, or be
    blamed on, the agent.
    """

    def __init__(self, transport: Any, peer_id: str) -> None:
        self.transport = transport
        self.session_id = f"echo-{peer_id[:6]}"
        self.controls: list[tuple[str, dict]] = []

    async def on_message(self, msg: dict[str, Any]) -> dict[str, Any]:
        command = str(msg.get("command"))
        self.controls.append((command, dict(msg.get("args") or {})))
        if command == "end":
            await self.end("ended by control")
        elif command == "emit":  # send the given session event back, as a session would (page tests)
            await self.transport.send_event(dict((msg.get("args") or {}).get("event") or {}))
        return {"type": "control_result", "id": msg.get("id"), "command": command, "ok": True, "echoed": command}

    async def end(self, reason: str) -> None:
        await self.transport.close(reason)  # audio_in() ends, and so does run()

    async def run(self) -> None:
        from rejoinder.streaming.frames import AudioFrame, FrameChunker

        # Sent at once: the client's data channel is usually not open yet, so this checks the buffering.
        await self.transport.send_event({"type": "session_started", "session_id": self.session_id})
        chunker = FrameChunker(16_000)
        utterance: list[np.ndarray] = []
        quiet = 0
        playing: set[asyncio.Task] = set()
        async for frame in self.transport.audio_in():
            for f in chunker.push(frame):
                loud = float(np.sqrt(np.mean(f.samples**2))) > 0.01
                if loud or utterance:
                    utterance.append(f.samples)
                    quiet = 0 if loud else quiet + 1
                if utterance and quiet >= 25:  # 0.5 s of silence ends the utterance
                    audio = np.concatenate(utterance)
                    utterance = []
                    task = asyncio.ensure_future(self._play(audio, AudioFrame))
                    playing.add(task)
                    task.add_done_callback(playing.discard)
        for t in playing:
            t.cancel()

    async def _play(self, audio: np.ndarray, frame_type: Any) -> None:
        await self.transport.send_event({"type": "echo_started", "seconds": audio.size / 16_000})
        t0 = time.monotonic()
        for k, i in enumerate(range(0, audio.size, 320)):
            due = t0 + k * 0.02
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            pcm = (np.clip(audio[i : i + 320], -1, 1) * 32767).astype(np.int16)
            await self.transport.send_audio(frame_type(pcm, 16_000, 1, due))
        await self.transport.send_event({"type": "echo_done", "seconds": audio.size / 16_000})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
