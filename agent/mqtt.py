"""Call-center events out and control commands in, over MQTT, without ever touching the audio path.

Topics and the connection: `agent.mqtt_client` (status, per-session events, per-session control).

`MQTTBridge.publish_event()` is synchronous and only appends to a bounded in-memory queue
(`agent.mqtt_queue`); one background task owns the connection, publishes the queue in order,
reconnects with capped backoff and re-announces presence. A broker that is absent, slow or
restarting therefore costs the session nothing but queue memory, and when the queue is full the
least valuable events go first: interim (`"final": false`) events, which a later final supersedes,
before anything else.

Delivery is at-least-once for QoS 1 events: an event whose PUBACK was lost with the connection is
sent again after reconnect. Every payload carries a per-session `seq` so a consumer can drop the
duplicates and see gaps left by dropped events.

Control messages are validated against the one command table (`agent.control`, channel "mqtt")
before any handler sees them; events are encoded by the one event encoder
(`streaming.transport.event_json`). The bridge never touches audio.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiomqtt
from aiomqtt import MqttError, ProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from rejoinder.streaming.transport import event_json

from .control import CommandRefused, ControlCommand, dispatch, parse_command
from .mqtt_client import (
    MQTTConfig,
    _protocol,
    _safe_level,
    control_topic,
    events_topic,
    is_protocol_refusal,
    open_client,
    status_topic,
)
from .mqtt_queue import MQTTStats, _Out, _OutQueue, is_interim

if TYPE_CHECKING:
    from .config import MQTTSettings
    from .session import Session

log = logging.getLogger("rejoinder.agent.mqtt")

__all__ = [
    "PAYLOAD_VERSION",
    "ControlHandler",
    "MQTTBridge",
    "MQTTConfig",
    "MQTTStats",
    "control_topic",
    "events_topic",
    "is_interim",
    "is_protocol_refusal",
    "open_client",
    "start_bridge",
    "status_topic",
]

PAYLOAD_VERSION = 1
_SEQ_SESSIONS = 4096  # sessions whose event counter is remembered (least recently used forgotten)

ControlHandler = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]


def _dumps(payload: Mapping[str, Any]) -> bytes:
    return event_json(payload).encode()


# --- the bridge -------------------------------------------------------------------------------------


class MQTTBridge:
    """One agent process's connection: events of all its sessions out, control commands in.

        bridge = MQTTBridge(MQTTConfig.from_url(url, agent_id="desk-1"))
        await bridge.start()          # returns at once, broker or not
        bridge.attach(session)        # events out, control in; detached at session_ended
        await session.run()
        await bridge.close()          # flushes, publishes "offline"

    Without `attach`: `register_session(sid, handler)` / `unregister_session(sid)` for control, and
    `listen(event)` or `publish_event(sid, dict)` for events.
    """

    def __init__(self, cfg: MQTTConfig) -> None:
        self.cfg = cfg
        self._stats = MQTTStats()
        self._queue = _OutQueue(cfg.queue_limit, self._stats)
        self._handlers: dict[str, ControlHandler] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Recently used sessions' counters only: a long-running server must not keep every id, and an
        # event after session_ended (the ack of "end") must not restart a session's count at 1.
        self._seq: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._seq_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._connected_evt = asyncio.Event()
        self._presence_dirty = False
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._protocol = _protocol(self.cfg.protocol)
        self._started_wall = time.time()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; never raises for an absent broker."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._started_wall = time.time()
        self._task = asyncio.create_task(self._run(), name="rejoinder-mqtt")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected_evt.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    @property
    def connected(self) -> bool:
        return self._connected_evt.is_set()

    @property
    def stats(self) -> MQTTStats:
        return dataclasses.replace(self._stats, queued=len(self._queue), connected=self.connected)

    async def close(self, timeout: float = 3.0) -> None:
        """Flush what is queued and publish "offline" when connected (up to `timeout`), then stop."""
        if self._task is None:
            return
        self._closing = True
        self._wake_up()
        task, self._task = self._task, None
        if self.connected:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except Exception:  # noqa: BLE001 - timed out or failed: stopping anyway
                pass
        if not task.done():
            task.cancel()
        for t in list(self._control_tasks):
            t.cancel()
        await asyncio.gather(task, *self._control_tasks, return_exceptions=True)
        left = len(self._queue)
        if left:
            log.info("MQTT bridge closed with %d event(s) unpublished", left)

    async def __aenter__(self) -> MQTTBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- sessions ------------------------------------------------------------------------------

    def register_session(self, session_id: str, handler: ControlHandler) -> None:
        """Route control commands for `session_id` to `handler(command, args) -> {"ok": ...}`."""
        sid = _safe_level(session_id)
        self._handlers[sid] = handler
        self._locks.setdefault(sid, asyncio.Lock())
        self._presence_changed()

    def unregister_session(self, session_id: str) -> None:
        sid = _safe_level(session_id)
        self._handlers.pop(sid, None)
        self._locks.pop(sid, None)
        self._presence_changed()

    @property
    def sessions(self) -> list[str]:
        return list(self._handlers)

    def attach(self, session: Session) -> Callable[[], None]:
        """Wire a session to MQTT: its events are published and its control topic runs commands on it
        (`agent.control.dispatch`); when its `session_ended` event passes, it is unregistered.
        Returns a function that detaches it early.
        """
        sid = str(session.session_id)
        attached = True

        def listener(event: Any) -> None:
            nonlocal attached
            if not attached:
                return
            self.listen(event)
            if getattr(event, "type", None) == "session_ended":
                detach()

        def detach() -> None:
            nonlocal attached
            if attached:
                attached = False
                self.unregister_session(sid)

        async def control(command: str, args: dict[str, Any]) -> Mapping[str, Any]:
            return await dispatch(session, ControlCommand(command, args))

        self.register_session(sid, control)
        session.add_listener(listener)
        return detach

    # --- events out ----------------------------------------------------------------------------

    def listen(self, event: Any) -> None:
        """A session listener: takes a SessionEvent (anything with to_dict() and session_id) or a dict."""
        d = event.to_dict() if hasattr(event, "to_dict") else dict(event)
        self.publish_event(str(d.get("session_id") or getattr(event, "session_id", "") or "_"), d)

    def publish_event(self, session_id: str, event: Mapping[str, Any]) -> None:
        """Queue one event for publishing. Never blocks, never raises: the audio path calls this."""
        try:
            sid = _safe_level(session_id)
            type_ = _safe_level(str(event.get("type") or "event"))
            with self._seq_lock:
                seq = self._seq.pop(sid, 0) + 1
                self._seq[sid] = seq
                if len(self._seq) > _SEQ_SESSIONS:
                    self._seq.popitem(last=False)
            body: dict[str, Any] = {"v": PAYLOAD_VERSION, "seq": seq, **event}
            body["v"] = PAYLOAD_VERSION
            body.setdefault("session_id", session_id)
            body.setdefault("wall_time", time.time())
            interim = is_interim(event)
            self._queue.put(_Out(events_topic(self.cfg.agent_id, sid, type_), _dumps(body),
                                 0 if interim else 1, False, interim))
            self._wake_up()
        except Exception:  # noqa: BLE001 - an event lost is better than a conversation broken
            self._stats.dropped_other += 1
            log.debug("could not queue event %r", event, exc_info=True)

    def _wake_up(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def _presence_changed(self) -> None:
        self._presence_dirty = True
        self._wake_up()

    def _presence(self, state: str, **extra: Any) -> bytes:
        return _dumps({"v": PAYLOAD_VERSION, "type": "status", "state": state, "agent_id": self.cfg.agent_id,
                       "client_id": self.cfg.client_id, "pid": os.getpid(), "sessions": self.sessions,
                       "since": self._started_wall, "wall_time": time.time(), **extra})

    # --- connection ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.cfg.backoff_min_s
        failures = 0
        while not self._closing:
            # The broker publishes this if the connection dies without a goodbye (crash, kill -9,
            # network loss), so a dashboard never shows a dead agent as online.
            will_body = {"v": PAYLOAD_VERSION, "type": "status", "state": "offline", "agent_id": self.cfg.agent_id,
                         "client_id": self.cfg.client_id, "pid": os.getpid(), "sessions": [],
                         "since": self._started_wall, "reason": "connection lost"}
            will = aiomqtt.Will(status_topic(self.cfg.agent_id), _dumps(will_body), qos=1, retain=True)
            client = open_client(self.cfg, protocol=self._protocol, will=will)
            connected = False
            try:
                async with client:
                    connected = True
                    self._stats.connects += 1
                    if self._stats.connects > 1:
                        self._stats.reconnects += 1
                    if failures:
                        log.info("MQTT connected to %s after %d failed attempt(s)", self.cfg.display_url, failures)
                    else:
                        log.debug("MQTT connected to %s", self.cfg.display_url)
                    delay, failures = self.cfg.backoff_min_s, 0
                    await self._serve(client)
                return  # _serve returns only once closing is done
            except MqttError as exc:
                if not connected and self._protocol == ProtocolVersion.V5 and self.cfg.protocol == "auto" \
                        and is_protocol_refusal(exc):
                    log.info("MQTT broker at %s refused MQTT 5; using 3.1.1", self.cfg.display_url)
                    self._protocol = ProtocolVersion.V311
                    continue
                self._log_failure(exc, connected, failures)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug here must not end event delivery for good
                log.warning("MQTT bridge error (%s: %s); reconnecting", type(exc).__name__, exc, exc_info=True)
            finally:
                self._connected_evt.clear()
            failures += 1
            if self._closing:
                return
            # Jitter so a fleet of agents does not reconnect in lockstep after a broker restart.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.backoff_max_s)

    def _log_failure(self, exc: BaseException, was_connected: bool, failures: int) -> None:
        if was_connected:
            log.warning("MQTT connection to %s lost (%s); %d event(s) queued, reconnecting",
                        self.cfg.display_url, exc, len(self._queue))
        elif failures == 0:
            log.warning("MQTT broker at %s unreachable (%s); retrying in the background",
                        self.cfg.display_url, exc)
        else:
            log.debug("MQTT connect attempt %d failed: %s", failures + 1, exc)

    async def _serve(self, client: aiomqtt.Client) -> None:
        # Subscribe before announcing "online": whoever reacts to presence with a command must find
        # the agent listening.
        await self._subscribe_control(client)
        self._presence_dirty = False
        await client.publish(status_topic(self.cfg.agent_id), self._presence("online", protocol=self._proto_name()),
                             qos=1, retain=True, timeout=self.cfg.publish_timeout_s)
        self._connected_evt.set()
        reader = asyncio.create_task(self._read(client), name="rejoinder-mqtt-read")
        writer = asyncio.create_task(self._write(client), name="rejoinder-mqtt-write")
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reader, writer):
                t.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        for t in done:
            t.result()  # raises the MqttError that ended the connection
        if not self._closing:
            raise MqttError("connection loop ended")

    async def _subscribe_control(self, client: aiomqtt.Client) -> None:
        topic = control_topic(self.cfg.agent_id)
        if self._protocol == ProtocolVersion.V5:
            # Retain-as-published: without it the broker clears the retain flag of a message that
            # matches an existing subscription, so a retained command published while the agent is
            # connected would look live and run (and run again at every reconnect, now retained).
            await client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True),
                                   timeout=self.cfg.publish_timeout_s)
        else:
            # MQTT 3.1.1 has no such option: only retained commands present at subscribe time are
            # recognisable (the broker flags those); see `_on_control`.
            await client.subscribe(topic, qos=1, timeout=self.cfg.publish_timeout_s)

    def _proto_name(self) -> str:
        return "5" if self._protocol == ProtocolVersion.V5 else "3.1.1"

    async def _write(self, client: aiomqtt.Client) -> None:
        while True:
            if self._presence_dirty:
                self._presence_dirty = False
                try:
                    await client.publish(status_topic(self.cfg.agent_id),
                                         self._presence("online", protocol=self._proto_name()),
                                         qos=1, retain=True, timeout=self.cfg.publish_timeout_s)
                except BaseException:
                    self._presence_dirty = True
                    raise
            batch = self._queue.take(self.cfg.inflight)
            if not batch:
                if self._closing:
                    await client.publish(status_topic(self.cfg.agent_id), self._presence("offline", reason="shutdown"),
                                         qos=1, retain=True, timeout=self.cfg.publish_timeout_s)
                    return
                self._wake.clear()
                if not len(self._queue) and not self._presence_dirty and not self._closing:
                    await self._wake.wait()
                continue
            await self._publish_batch(client, batch)

    async def _publish_batch(self, client: aiomqtt.Client, batch: list[_Out]) -> None:
        # paho writes publishes in call order, and each task calls paho before its first await,
        # so the wire order is the queue order even though the PUBACK waits overlap.
        tasks = [asyncio.ensure_future(client.publish(o.topic, o.payload, qos=o.qos, retain=o.retain,
                                                      timeout=self.cfg.publish_timeout_s)) for o in batch]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            ok = [not t.cancelled() and t.exception() is None for t in tasks]
            self._stats.published += sum(ok)
            self._queue.put_back([o for o, good in zip(batch, ok) if not good])
            raise
        self._stats.published += len(batch)

    # --- control in ----------------------------------------------------------------------------

    async def _read(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            try:
                self._on_control(msg)
            except Exception:  # noqa: BLE001
                log.exception("MQTT control message handling failed")

    def _on_control(self, msg: aiomqtt.Message) -> None:
        parts = msg.topic.value.split("/")
        if len(parts) != 5 or parts[4] != "control":
            return
        sid = parts[3]
        if not msg.payload and (msg.retain or self._protocol != ProtocolVersion.V5):
            # Someone cleared a retained command (an empty retained publish): nothing was asked.
            # Over 3.1.1 the broker drops the retain flag for live subscribers, so any empty
            # payload may be such a clear there.
            log.debug("MQTT control for session %s: retained message cleared", sid)
            return
        self._stats.control_received += 1
        if msg.retain:
            # A retained command would run again on every reconnect of every agent: refuse it.
            try:  # the id, when it can be read, lets the sender match the refusal to its request
                stale = parse_command(msg.payload, "mqtt")  # type: ignore[arg-type]
                cid, command = stale.id, stale.command
            except CommandRefused as exc:
                cid, command = exc.id, exc.command
            self._reject(sid, "retained control messages are not accepted: publish commands without the retain "
                         "flag, and clear the retained message (an empty retained publish)", cid, command)
            return
        try:
            cmd = parse_command(msg.payload, "mqtt")  # type: ignore[arg-type]
        except CommandRefused as exc:
            self._reject(sid, exc.message, exc.id, exc.command)
            return
        handler = self._handlers.get(sid)
        if handler is None:
            self._reject(sid, f"unknown session {sid!r}", cmd.id, cmd.command)
            return
        lock = self._locks.setdefault(sid, asyncio.Lock())
        task = asyncio.create_task(self._execute(sid, handler, lock, cmd), name=f"rejoinder-mqtt-control-{sid}")
        self._control_tasks.add(task)
        task.add_done_callback(self._control_tasks.discard)

    async def _execute(self, sid: str, handler: ControlHandler, lock: asyncio.Lock, cmd: ControlCommand) -> None:
        # One command at a time per session, in arrival order (asyncio.Lock is FIFO): "say" then
        # "end" must not race.
        async with lock:
            try:
                result = await asyncio.wait_for(handler(cmd.command, dict(cmd.args)), self.cfg.control_timeout_s)
            except asyncio.TimeoutError:
                self._reject(sid, f"{cmd.command}: no answer within {self.cfg.control_timeout_s:g} s",
                             cmd.id, cmd.command)
                return
            except Exception as exc:  # noqa: BLE001
                self._reject(sid, f"{cmd.command} failed: {type(exc).__name__}: {exc}", cmd.id, cmd.command)
                return
        if not isinstance(result, Mapping):
            self._reject(sid, f"{cmd.command}: handler returned {type(result).__name__}, not a dict",
                         cmd.id, cmd.command)
        elif result.get("ok"):
            self.publish_event(sid, {"type": "ack", "session_id": sid, "at": time.monotonic(),
                                     "command": cmd.command, "id": cmd.id, "result": dict(result)})
        else:
            self._reject(sid, str(result.get("error") or f"{cmd.command} failed"), cmd.id, cmd.command,
                         result=dict(result))

    def _reject(self, sid: str, message: str, cid: str | int | None, command: str | None = None, **extra: Any) -> None:
        self._stats.control_rejected += 1
        log.info("MQTT control for session %s refused: %s", sid, message)
        self.publish_event(sid, {"type": "error", "session_id": sid, "at": time.monotonic(), "where": "control",
                                 "message": message, "fatal": False, "id": cid, "command": command, **extra})


async def start_bridge(settings: MQTTSettings) -> MQTTBridge | None:
    """The bridge the settings ask for, started (it connects in the background), or None when MQTT is off."""
    cfg = MQTTConfig.from_settings(settings)
    if cfg is None:
        return None
    bridge = MQTTBridge(cfg)
    await bridge.start()
    return bridge
