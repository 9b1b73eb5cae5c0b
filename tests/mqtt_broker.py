"""A real Mosquitto broker for tests, on a free loopback port, that can be killed and brought back.

The broker keeps its port across `kill()` / `start()` so clients that were configured with its URL
see exactly what they would see in production: the broker vanishing and coming back at the same
address. Persistence is off, so a restart also loses retained messages and sessions, like a
crashed broker without a store.

Also the fixtures and predicates the MQTT test modules share (`broker`, `own_broker`, `recorder`,
`make_bridge`, registered in conftest.py) and predicates (`is_event`, `is_status`, ...).
"""
from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from rejoinder.agent.mqtt import MQTTBridge, MQTTConfig, status_topic

__all__ = ["Broker", "Handler", "Received", "Recorder", "agent_id", "broker", "events", "final", "find_mosquitto",
           "free_port", "interim", "is_event", "is_status", "make_bridge", "own_broker", "recorder", "until"]


def find_mosquitto() -> str | None:
    # Debian installs the daemon in /usr/sbin, which is often not on a non-root PATH.
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    workdir: Path
    port: int = field(default_factory=free_port)
    binary: str = field(default_factory=lambda: find_mosquitto() or "mosquitto")
    certfile: Path | None = None  # serve TLS with this certificate (and keyfile)
    keyfile: Path | None = None
    password_file: Path | None = None  # require these users (mosquitto_passwd format)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.certfile else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        tls = f"certfile {self.certfile}\nkeyfile {self.keyfile}\n" if self.certfile else ""
        auth = (f"allow_anonymous false\npassword_file {self.password_file}\n" if self.password_file
                else "allow_anonymous true\n")
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + tls + auth +
            "persistence false\n"
            # Run as whoever runs the tests: as root, mosquitto would otherwise switch to its own
            # user and lose access to the log file in the test's temporary folder.
            f"user {getpass.getuser()}\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        return conf

    def start(self, timeout: float = 5.0) -> Broker:
        if self.running:
            return self
        conf = self._write_config()
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
            if _port_open(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s: {self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Crash the broker (SIGKILL): connections drop without any MQTT goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> Broker:
        self.kill()
        return self.start()

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float  # time.monotonic() when it arrived

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    """A real MQTT subscriber (paho, on its own network thread) that records everything it receives.

    `connect()` blocks until the broker has acknowledged the subscriptions. That it blocks is the
    point: called from an async test right after the broker (re)starts, it holds the event loop, so
    the bridge under test cannot connect and publish before the recorder is listening.
    """

    def __init__(self, port: int, topics: Iterable[str] = ("rejoinder/#",), *, protocol: int = paho.MQTTv5,
                 ca_file: str | None = None, username: str | None = None, password: str | None = None) -> None:
        self.port = port
        self.topics = tuple(topics)
        self.protocol = protocol
        self.ca_file = ca_file
        self.username, self.password = username, password
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._client: paho.Client | None = None

    def connect(self, timeout: float = 5.0) -> Recorder:
        self.close()
        c = paho.Client(CallbackAPIVersion.VERSION2, protocol=self.protocol, reconnect_on_failure=False)
        if self.ca_file:
            c.tls_set_context(ssl.create_default_context(cafile=self.ca_file))
        if self.username:
            c.username_pw_set(self.username, self.password)
        connected, subscribed = threading.Event(), threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", self.port, keepalive=30)
        c.loop_start()
        self._client = c
        if not connected.wait(timeout):
            raise TimeoutError("recorder: no CONNACK")
        for t in self.topics:
            subscribed.clear()
            c.subscribe(t, qos=1)
            if not subscribed.wait(timeout):
                raise TimeoutError(f"recorder: no SUBACK for {t}")
        return self

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), time.monotonic()))

    def publish(self, topic: str, payload: bytes | str | dict, *, qos: int = 1, retain: bool = False) -> None:
        assert self._client is not None, "recorder not connected"
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        self._client.publish(topic, data, qos=qos, retain=retain)

    def received(self, predicate: Callable[[Received], bool] = lambda m: True) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    async def wait_for(self, predicate: Callable[[Received], bool], count: int = 1,
                       timeout: float = 5.0) -> list[Received]:
        """The first `count` messages matching `predicate`, waiting for them without blocking the loop."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.received(predicate)
            if len(got) >= count:
                return got[:count]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {len(got)}/{count} matching messages; "
                                     f"all topics: {[m.topic for m in self.received()]}")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def __enter__(self) -> Recorder:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- fixtures and helpers of the MQTT test modules (import them from there) --------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """One broker for the tests that do not disturb it; each test uses its own agent id."""
    with Broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def own_broker(tmp_path):
    """A broker this test may kill and restart (not started yet: its port is reserved)."""
    b = Broker(tmp_path / "mosquitto")
    yield b
    b.kill()


@pytest.fixture
def agent_id() -> str:
    return f"agent-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def recorder(broker, agent_id):
    with Recorder(broker.port, topics=(f"rejoinder/{agent_id}/#",)) as r:
        yield r


@pytest.fixture
async def make_bridge():
    made: list[MQTTBridge] = []

    def make(url: str, agent_id: str, **kw) -> MQTTBridge:
        b = MQTTBridge(MQTTConfig.from_url(url, agent_id=agent_id, **kw))
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close(timeout=1.0)


def events(rec: Recorder, agent_id: str, type_: str | None = None) -> list[Received]:
    prefix = f"rejoinder/{agent_id}/sessions/"
    return rec.received(lambda m: m.topic.startswith(prefix) and "/events/" in m.topic
                        and (type_ is None or m.topic.endswith(f"/events/{type_}")))


def is_event(agent_id: str, type_: str, **fields):
    def pred(m: Received) -> bool:
        if not (m.topic.startswith(f"rejoinder/{agent_id}/sessions/") and m.topic.endswith(f"/events/{type_}")):
            return False
        body = m.json
        return all(body.get(k) == v for k, v in fields.items())
    return pred


def is_status(agent_id: str, state: str, retained: bool | None = None):
    def pred(m: Received) -> bool:
        return (m.topic == status_topic(agent_id) and bool(m.payload) and m.json.get("state") == state
                and (retained is None or m.retain == retained))
    return pred


def final(sid: str, text: str) -> dict:
    return {"type": "transcript", "session_id": sid, "text": text, "final": True, "utterance_id": 0,
            "at": time.monotonic()}


def interim(sid: str, text: str) -> dict:
    return {**final(sid, text), "final": False}


async def until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Handler:
    def __init__(self, result=None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.result = result

    async def __call__(self, command: str, args: dict) -> dict:
        self.calls.append((command, args))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result if self.result is not None else {"ok": True, "spoken": args.get("text")}
