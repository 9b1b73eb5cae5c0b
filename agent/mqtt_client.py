"""Where and how the agent reaches an MQTT broker: topics, the connection config, the client.

Topics (agent_id and session_id are single topic levels):

    rejoinder/{agent_id}/status                               retained presence, last will "offline"
    rejoinder/{agent_id}/sessions/{session_id}/events/{type}  session events, JSON {"v": 1, "seq", ...}
    rejoinder/{agent_id}/sessions/{session_id}/control        commands in: {"command", "args", "id"}

`MQTTConfig` is built from the agent's settings (`MQTTConfig.from_settings`) or a URL; `open_client`
makes the aiomqtt client for it, MQTT 5 first, with 3.1.1 as the fallback a refusing broker gets.
The bridge that uses them is `agent.mqtt`.
"""
from __future__ import annotations

import logging
import socket
import ssl
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError

from rejoinder.errors import ConfigError

if TYPE_CHECKING:
    from .config import MQTTSettings

log = logging.getLogger("rejoinder.agent.mqtt")

__all__ = ["TOPIC_ROOT", "MQTTConfig", "control_topic", "events_topic", "is_protocol_refusal", "open_client",
           "status_topic"]

TOPIC_ROOT = "rejoinder"


# --- topics -----------------------------------------------------------------------------------------


def status_topic(agent_id: str) -> str:
    return f"{TOPIC_ROOT}/{agent_id}/status"


def events_topic(agent_id: str, session_id: str, type_: str = "#") -> str:
    return f"{TOPIC_ROOT}/{agent_id}/sessions/{session_id}/events/{type_}"


def control_topic(agent_id: str, session_id: str = "+") -> str:
    return f"{TOPIC_ROOT}/{agent_id}/sessions/{session_id}/control"


def _topic_level(name: str, what: str) -> str:
    """A string usable as one topic level: wildcards and separators would change what it addresses."""
    if not name or any(c in name for c in "/+#\0"):
        raise ConfigError(f"{what} {name!r} must be non-empty and contain none of / + # NUL")
    return name


def _safe_level(name: str) -> str:
    # Session ids come from the session and are uuid-like; this is only a guard so a stray
    # character can never publish into another session's (or a wildcard) topic.
    cleaned = "".join("_" if c in "/+#\0" else c for c in str(name))
    return cleaned or "_"


# --- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MQTTConfig:
    """Where and how to connect. Build it with `MQTTConfig.from_url("mqtt://host:1883", agent_id=...)`.

    protocol: "auto" tries MQTT 5 and falls back to 3.1.1 when the broker refuses the version
    (remembered for later reconnects); "5" or "3.1.1" force one.
    """

    url: str = "mqtt://127.0.0.1:1883"
    agent_id: str = "rejoinder"
    client_id: str = ""  # empty: rejoinder-{agent_id}-{random}, unique so two agents never evict each other
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None  # TLS: trust this CA instead of the system store
    tls_insecure: bool = False  # TLS: skip certificate and host name checks (tests, private brokers)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive: int = 30
    queue_limit: int = 1000
    backoff_min_s: float = 0.1
    backoff_max_s: float = 2.0
    connect_timeout_s: float = 5.0
    publish_timeout_s: float = 5.0
    control_timeout_s: float = 10.0
    inflight: int = 32  # QoS 1 publishes awaiting PUBACK at once: one round trip per batch, not per event

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl", "tls"):
            raise ConfigError(f"MQTT URL must start with mqtt:// or mqtts://, got {self.url!r}")
        if not parts.hostname:
            raise ConfigError(f"MQTT URL has no host: {self.url!r}")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ConfigError(f"MQTT URL has a bad port: {self.url!r}") from None
        _topic_level(self.agent_id, "agent id")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")
        if self.queue_limit < 1 or self.inflight < 1:
            raise ConfigError("queue_limit and inflight must be at least 1")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise ConfigError("need 0 < backoff_min_s <= backoff_max_s")
        if not self.client_id:
            object.__setattr__(self, "client_id", f"rejoinder-{self.agent_id}-{uuid.uuid4().hex[:8]}")

    @classmethod
    def from_url(cls, url: str, *, agent_id: str | None = None, **overrides: Any) -> MQTTConfig:
        """Config from a URL; `mqtt://user:password@host:port` carries credentials too.

        Explicit keyword arguments win over what the URL says.
        """
        parts = urlsplit(url)
        values: dict[str, Any] = {"url": url}
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password:
            values["password"] = unquote(parts.password)
        if agent_id is not None:
            values["agent_id"] = agent_id
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_settings(cls, settings: MQTTSettings, **overrides: Any) -> MQTTConfig | None:
        """The bridge's config for the agent's MQTT settings (None: MQTT is off).

        The agent id defaults to the host name, so a fleet of machines gets distinct ids without
        configuration.
        """
        if not settings.url:
            return None
        values: dict[str, Any] = {
            "username": settings.username or None,
            "password": settings.password or None,
            "ca_file": settings.ca_file or None,
            "tls_insecure": settings.insecure or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        aid = settings.agent_id or _safe_level(socket.gethostname().split(".")[0] or "rejoinder")
        return cls.from_url(settings.url, agent_id=aid, **values)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl", "tls")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def display_url(self) -> str:
        """The URL without credentials, for logs."""
        return f"{urlsplit(self.url).scheme}://{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _protocol(name: str) -> ProtocolVersion:
    return ProtocolVersion.V311 if name == "3.1.1" else ProtocolVersion.V5


def is_protocol_refusal(exc: BaseException) -> bool:
    """The broker refused the MQTT version (a 3.1.1-only broker answering an MQTT 5 CONNECT)."""
    if not isinstance(exc, MqttConnectError):
        return False
    rc = getattr(exc.rc, "value", exc.rc)
    return rc in (1, 0x84)  # 3.1.1 "unacceptable protocol version" / MQTT 5 "unsupported protocol version"


class _DemoteToDebug(logging.Filter):
    """paho reports every lost connection at ERROR; the bridge already says it once, in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return log.isEnabledFor(logging.DEBUG)


_paho_log = logging.getLogger("rejoinder.agent.mqtt.paho")
_paho_log.addFilter(_DemoteToDebug())


def open_client(cfg: MQTTConfig, *, protocol: ProtocolVersion | None = None, will: aiomqtt.Will | None = None,
                client_id: str | None = None) -> aiomqtt.Client:
    """An aiomqtt client for `cfg` (not yet connected: use it as `async with`)."""
    client = aiomqtt.Client(
        cfg.host,
        cfg.port,
        username=cfg.username,
        password=cfg.password,
        identifier=client_id or cfg.client_id,
        protocol=protocol if protocol is not None else _protocol(cfg.protocol),
        will=will,
        keepalive=cfg.keepalive,
        timeout=cfg.connect_timeout_s,
        tls_context=cfg.tls_context(),
        tls_insecure=True if (cfg.tls and cfg.tls_insecure) else None,
        max_queued_incoming_messages=1024,
        max_inflight_messages=cfg.inflight,
        logger=_paho_log,
    )
    # aiomqtt warns above 10 pending calls; a full in-flight window is normal here.
    client.pending_calls_threshold = cfg.inflight + 16
    return client
