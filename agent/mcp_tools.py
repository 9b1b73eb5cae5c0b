"""Which tools come from MCP servers, and how are they called?

`MCPTools` holds the connections to the configured Model Context Protocol servers
(`--mcp-server`, agent.mcp_servers) — one set per process, opened by `rejoinder serve`/`talk` and by
each LiveKit job, shared by every session of that process — and turns each tool a server lists into
an `agent.tools.Tool`: the same name (prefixed with the server's name when two servers offer it), its
description, its input JSON schema as `parameters`, and a function that calls the server
(`tools/call`) with a timeout and gives the result's text (or structured content) to the model.

Why one set per process: an MCP server is a service (an order database, a CRM), not per-call state;
a stdio server takes seconds to start, and one connection carries many concurrent calls (JSON-RPC
ids), so a call that starts does not wait for a server to start and a busy process does not run a
copy of every server per call.

Ownership: each server has one task, its runner, that opens the transport (spawns the stdio command,
or connects to the URL) and the `mcp.ClientSession` inside it, lists the tools, and holds them open
until `aclose()`. The SDK's transports are anyio task groups, which must be entered and left by the
same task, and which tear down their task when the connection breaks; so a session's tool call only
sends a request over the runner's connection and never owns a part of it. A connection that breaks
(the server exits, its HTTP endpoint goes away) ends the runner's connection, which reconnects with a
back-off (1 s doubling to 30 s) and lists the tools again; the tools of a server that is down fail
fast with a clear error meanwhile. `aclose()` is bounded: the SDK closes a stdio server's stdin, then
terminates and kills its process group within a few seconds, and whatever is left after
`CLOSE_TIMEOUT_S` is cancelled: a dead or hung server never holds the process at shutdown.

What sessions see (`attach(session)`): a server that is down when a session starts, or that goes
away during it, is an `error` event (`SessionError`, where="mcp", naming the server); a call that
fails (timeout, server gone mid-call, the tool's own error) raises, so the `tool_call` event carries
the error, the model is told it as the tool's result, and the session goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .events import SessionEnded, SessionError, SessionEvent, SessionStarted, SessionState
from .mcp_servers import MCPServerEntry
from .tools import Tool, ToolError

if TYPE_CHECKING:
    from .config import CallSettings
    from .session import Session

log = logging.getLogger("rejoinder.agent.mcp")

__all__ = ["MCPCallError", "MCPServerConnection", "MCPTools"]

CLOSE_TIMEOUT_S = 8.0  # stdio: stdin closed, 2 s grace, SIGTERM, 2 s, SIGKILL (the SDK's own bounds)
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
MAX_RESULT_CHARS = 2000  # what one result may add to the model's context
MAX_DESCRIPTION_CHARS = 400
MAX_ERROR_CHARS = 300


class MCPCallError(ToolError):
    """An MCP tool call that did not give a result; the message names the server and says why (it is
    what the `tool_call` event's `error` and the model's tool result say)."""


class _WatchedStream:
    """The transport's read stream, telling its owner when the server's side ends (stdio: it exited)."""

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    async def receive(self) -> Any:
        import anyio

        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    def __aiter__(self) -> _WatchedStream:
        return self

    async def __anext__(self) -> Any:
        import anyio

        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedStream:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._inner.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:  # last_context (streamable HTTP) and the like
        return getattr(self._inner, name)


class MCPServerConnection:
    """One MCP server: its runner task, its connection while up, its tools as last listed."""

    def __init__(self, entry: MCPServerEntry, *, call_timeout_s: float, connect_timeout_s: float,
                 report: Callable[[MCPServerConnection, str], None]) -> None:
        self.entry = entry
        self.name = entry.name
        self.call_timeout_s = call_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.listed: list[Any] = []  # mcp.types.Tool, from the last listing
        self.error = ""  # why it is down ("" while up, or before the first attempt ends)
        self.connects = 0
        self._report = report
        self._client: Any = None  # the mcp.ClientSession while up
        self._task: asyncio.Task | None = None
        self._first_attempt = asyncio.Event()
        self._closing = asyncio.Event()
        self._wake = asyncio.Event()  # the connection ended, or close was asked

    @property
    def up(self) -> bool:
        return self._client is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"rejoinder-mcp-{self.name}")

    async def wait_first_attempt(self) -> None:
        await self._first_attempt.wait()

    async def aclose(self) -> None:
        self._closing.set()
        self._wake.set()
        task = self._task
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.warning("MCP server %r did not close within %.0f s; abandoning it", self.name, CLOSE_TIMEOUT_S)
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)

    # --- the runner ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RETRY_MIN_S
        while not self._closing.is_set():
            was_up = False
            try:
                async with self._connection() as client:
                    self._client, self.error, was_up = client, "", True
                    self.connects += 1
                    delay = RETRY_MIN_S
                    log.info("MCP server %r (%s) is up: %d tools (%s)", self.name, self.entry.transport,
                             len(self.listed), ", ".join(t.name for t in self.listed))
                    self._first_attempt.set()
                    await self._wake.wait()
                    self._client = None
                    if not self._closing.is_set():
                        raise MCPCallError("the server exited" if self.entry.command else "the connection closed")
            except Exception as exc:  # noqa: BLE001 - every failure of a server is reported, none is fatal
                self._client = None
                self.error = _reason(exc, self.connect_timeout_s, stdio=bool(self.entry.command))
                if self._closing.is_set():
                    break
                if was_up:  # a change sessions are told about; a retry that fails again is only logged
                    message = f"MCP server {self.name!r} went away ({self.error}); its tools fail until it is back"
                elif not self._first_attempt.is_set():
                    message = (f"MCP server {self.name!r} is unavailable ({self.error}); its tools are left out "
                               "until it answers")
                else:
                    message = ""
                    log.debug("MCP server %r still unavailable: %s", self.name, self.error)
                if message:
                    log.warning("%s", message)
                    self._report(self, message)
            finally:
                self._client = None
                self._wake.clear()
                self._first_attempt.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            delay = min(delay * 2, RETRY_MAX_S)

    @contextlib.asynccontextmanager
    async def _connection(self) -> Any:
        import anyio
        from mcp import ClientSession

        async with self._transport() as (read, write):
            async with ClientSession(_WatchedStream(read, self._wake.set), write,
                                     read_timeout_seconds=self.connect_timeout_s) as client:
                with anyio.fail_after(self.connect_timeout_s):
                    await client.initialize()
                    self.listed = await _list_tools(client)
                yield client

    def _transport(self) -> Any:
        if self.entry.command:
            from mcp import StdioServerParameters
            from mcp.client.stdio import stdio_client

            command, *args = self.entry.command
            return stdio_client(StdioServerParameters(command=command, args=args), errlog=_errlog())
        from mcp.client.streamable_http import streamable_http_client

        return streamable_http_client(self.entry.url)

    # --- calls (from any session's task) ---------------------------------------------------------------

    def _lost(self, client: Any) -> None:
        """A call found `client`'s connection broken: the runner reconnects (unless it already has)."""
        if self._client is client:
            self._wake.set()

    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        """The result of `tool` for the model (text, or the structured content); MCPCallError otherwise."""
        import anyio
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        client = self._client
        if client is None:
            raise MCPCallError(f"MCP server {self.name!r} is not connected ({self.error or 'starting'})")
        t = self.call_timeout_s
        try:
            # The SDK's read timeout counts from the request's write; the outer bound also covers a
            # server that stopped reading its input.
            with anyio.fail_after(t + 1.0):
                result = await client.call_tool(tool, arguments, read_timeout_seconds=t)
        except MCPError as exc:
            if exc.error.code == REQUEST_TIMEOUT:
                raise MCPCallError(f"MCP server {self.name!r} did not answer {tool} within {t:g} s") from None
            if exc.error.code == CONNECTION_CLOSED or self._client is not client:
                self._lost(client)
                raise MCPCallError(f"MCP server {self.name!r} went away during {tool} ({exc.error.message})") from None
            raise MCPCallError(f"MCP server {self.name!r} refused {tool}: {exc.error.message}") from None
        except TimeoutError:
            raise MCPCallError(f"MCP server {self.name!r} did not answer {tool} within {t:g} s") from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError) as exc:
            self._lost(client)
            raise MCPCallError(f"MCP server {self.name!r} went away during {tool} ({type(exc).__name__})") from None
        if result.is_error:
            said = " ".join(_text(result).split())
            said = said if len(said) <= MAX_ERROR_CHARS else said[: MAX_ERROR_CHARS - 1] + "…"
            raise MCPCallError(f"MCP server {self.name!r}: {said or f'{tool} failed'}")
        return _for_model(result)


class MCPTools:
    """The MCP servers of one process and the tools they offer (see the module docstring).

        async with MCPTools.from_settings(cfg.call) as mcp:
            session = Session(models, cfg, transport, tools=mcp.tools())
            mcp.attach(session)
    """

    def __init__(self, entries: Sequence[MCPServerEntry], *, call_timeout_s: float = 10.0,
                 connect_timeout_s: float = 30.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.servers = [MCPServerConnection(e, call_timeout_s=call_timeout_s, connect_timeout_s=connect_timeout_s,
                                            report=self._broadcast) for e in entries]
        self._sessions: set[Session] = set()
        self._started = False

    @classmethod
    def from_settings(cls, call: CallSettings) -> MCPTools:
        return cls(call.mcp, call_timeout_s=call.mcp_timeout_s, connect_timeout_s=call.mcp_connect_timeout_s)

    def __bool__(self) -> bool:
        return bool(self.servers)

    async def __aenter__(self) -> MCPTools:
        self.start()
        await self.ready()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start connecting to every server (returns at once; `ready()` waits for the first attempts)."""
        if not self._started:
            self._started = True
            for s in self.servers:
                s.start()

    async def ready(self) -> None:
        """Wait until every server has connected or failed once (at most the connect timeout, and a bit)."""
        self.start()
        if self.servers:
            waits = [asyncio.ensure_future(s.wait_first_attempt()) for s in self.servers]
            _, pending = await asyncio.wait(waits, timeout=self.connect_timeout_s + 2.0)
            for w in pending:
                w.cancel()

    async def aclose(self) -> None:
        await asyncio.gather(*(s.aclose() for s in self.servers))
        self._sessions.clear()

    # --- tools --------------------------------------------------------------------------------------

    def tools(self) -> list[Tool]:
        """The tools of the servers that are up now, as the LLM sees them (name clashes prefixed)."""
        up = [s for s in self.servers if s.up]
        count: dict[str, int] = {}
        for s in up:
            for t in s.listed:
                count[_identifier(t.name)] = count.get(_identifier(t.name), 0) + 1
        out: list[Tool] = []
        for s in up:
            for t in s.listed:
                local = _identifier(t.name)
                if count[local] > 1:
                    local = f"{_identifier(s.name)}_{local}"
                out.append(Tool(local, _description(t.description, s.name), _call(s, t.name),
                                _parameters(t.input_schema)))
        return out

    def summary(self) -> str:
        """One line for operators: which servers are up with how many tools, which are not and why."""
        return "; ".join(f"{s.name} ({s.entry.transport}): {len(s.listed)} tools" if s.up
                         else f"{s.name} ({s.entry.transport}): unavailable, {s.error or 'starting'}"
                         for s in self.servers)

    def status(self) -> list[dict[str, Any]]:
        """One line per server for operators: name, transport, up, tools, error."""
        return [{"name": s.name, "transport": s.entry.transport, "up": s.up, "tools": [t.name for t in s.listed]
                 if s.up else [], "error": s.error} for s in self.servers]

    # --- sessions -----------------------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        """Report this process's MCP trouble to `session` as `error` events: servers down when it starts,
        and servers that go away while it runs."""
        def on_event(event: SessionEvent) -> None:
            if isinstance(event, SessionStarted):
                self._sessions.add(session)
                for s in self.servers:
                    if not s.up and s.error:
                        session.emit(SessionError(session.session_id, where="mcp", message=(
                            f"MCP server {s.name!r} is unavailable ({s.error}); its tools are left out")))
            elif isinstance(event, SessionEnded):
                self._sessions.discard(session)

        session.add_listener(on_event)

    def _broadcast(self, server: MCPServerConnection, message: str) -> None:
        for session in list(self._sessions):
            if session.state != SessionState.ENDED:
                session.emit(SessionError(session.session_id, where="mcp", message=message))


# --- helpers ----------------------------------------------------------------------------------------------


def _call(server: MCPServerConnection, remote: str) -> Callable[..., Awaitable[Any]]:
    async def call_mcp_tool(**arguments: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await server.call(remote, arguments)
        finally:
            log.debug("MCP %s.%s took %.0f ms", server.name, remote, (time.monotonic() - t0) * 1000)

    return call_mcp_tool


async def _list_tools(client: Any) -> list[Any]:
    from mcp_types import PaginatedRequestParams

    listing = await client.list_tools()
    tools = list(listing.tools)
    while listing.next_cursor:
        listing = await client.list_tools(params=PaginatedRequestParams(cursor=listing.next_cursor))
        tools.extend(listing.tools)
    return tools


def _identifier(name: str) -> str:
    """An MCP tool name (letters, digits, _ - .) as a name the tool registry takes."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return out if re.match(r"[A-Za-z_]", out) else f"_{out}"


def _description(text: str | None, server: str) -> str:
    text = " ".join((text or "").split())
    if len(text) > MAX_DESCRIPTION_CHARS:
        text = text[: MAX_DESCRIPTION_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return text or f"A tool of the {server} service."


def _parameters(schema: dict[str, Any] | None) -> dict[str, Any]:
    """The input schema without `title`s (prompt tokens the model does not need)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    out = strip(dict(schema or {}))
    out.setdefault("type", "object")
    out.setdefault("properties", {})
    return out


def _text(result: Any) -> str:
    return "\n".join(b.text for b in result.content if getattr(b, "type", "") == "text").strip()


def _for_model(result: Any) -> Any:
    """Text blocks joined (what MCP servers write for the model), else the structured content, else a
    note of what came back (images, audio, resources are not spoken)."""
    text = _text(result)
    if text:
        return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + " … (truncated)"
    if result.structured_content is not None:
        return result.structured_content
    kinds = sorted({getattr(b, "type", "?") for b in result.content})
    return f"(the tool returned {', '.join(kinds)} content)" if kinds else "(no result)"


def _reason(exc: BaseException, connect_timeout_s: float, *, stdio: bool) -> str:
    """A failure as a few words: the innermost meaningful exception of an exception group."""
    from mcp import MCPError
    from mcp_types import CONNECTION_CLOSED

    while getattr(exc, "exceptions", None):  # an (anyio) exception group: what went wrong inside it
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    if isinstance(exc, TimeoutError):
        return f"no answer within {connect_timeout_s:g} s"
    if isinstance(exc, MCPCallError):
        return str(exc)
    if isinstance(exc, MCPError) and exc.error.code == CONNECTION_CLOSED:
        return "the server exited" if stdio else "the connection closed"
    message = getattr(getattr(exc, "error", None), "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _errlog() -> Any:
    """Where a stdio server's stderr goes: ours (a real file: the child writes to its descriptor)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    return sys.__stderr__
