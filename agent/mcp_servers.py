"""How is an MCP server written in the configuration? `[NAME=]stdio:<command line>` or `[NAME=]http(s)://…/mcp`.

An entry of `--mcp-server` (repeatable) or of REJOINDER_MCP_SERVERS (comma-separated) names one Model
Context Protocol server whose tools the LLM gets (agent.mcp_tools connects to them):

    stdio:python -m orders_server --db /srv/orders.db     spawned by the agent, spoken to over stdin/stdout
    https://tools.example.com/mcp                          streamable HTTP
    billing=stdio:npx -y @acme/billing-mcp                 NAME= sets the server's name

The name (given, or taken from the command's script/package or the URL's host and port) is what
messages and events say, and prefixes the server's tool names when two servers offer the same one.
A stdio server gets the MCP SDK's safe default environment (PATH, HOME, …), not the agent's: put
what it needs on its command line (`stdio:env API_KEY=… my-server`).
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from rejoinder.errors import ConfigError

__all__ = ["MCPServerEntry", "mcp_server_entries", "parse_mcp_server", "split_mcp_servers"]

_MCP_ENTRY_START = r"(?:[A-Za-z_][A-Za-z0-9_-]*=)?(?:stdio:|https?://)"
_LAUNCHERS = {"python", "python3", "node", "npx", "uv", "uvx", "bun", "bunx", "deno", "docker", "podman", "sh",
              "bash", "env", "exec", "pipx", "java"}


@dataclass(frozen=True)
class MCPServerEntry:
    """One configured MCP server: spawned over stdio (`command`) or reached over streamable HTTP (`url`)."""

    name: str
    command: tuple[str, ...] = ()
    url: str = ""

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"


def split_mcp_servers(raw: str) -> tuple[str, ...]:
    """REJOINDER_MCP_SERVERS: entries separated by commas; a comma inside a command line or URL stays
    (the value splits only where the next entry begins, at `stdio:`, `http://`, `https://` or `NAME=`)."""
    return tuple(p.strip() for p in re.split(rf",\s*(?={_MCP_ENTRY_START})", raw) if p.strip())


def parse_mcp_server(entry: str) -> MCPServerEntry:
    """One entry, or a ConfigError naming it."""
    from urllib.parse import urlsplit

    raw = entry.strip()
    where = f"--mcp-server / REJOINDER_MCP_SERVERS entry {entry!r}"
    m = re.match(r"([A-Za-z_][A-Za-z0-9_-]*)=(?=stdio:|https?://)", raw)
    name = m.group(1) if m else ""
    body = raw[m.end():] if m else raw
    if body.startswith("stdio:"):
        try:
            command = tuple(shlex.split(body[len("stdio:"):]))
        except ValueError as exc:
            raise ConfigError(f"{where}: cannot split the command line ({exc})") from None
        if not command:
            raise ConfigError(f"{where}: no command after 'stdio:'")
        return MCPServerEntry(name or _command_name(command), command=command)
    if re.match(r"https?://", body):
        try:
            url = urlsplit(body)
            port = url.port
        except ValueError as exc:
            raise ConfigError(f"{where}: not a usable URL ({exc})") from None
        if not url.hostname or any(c.isspace() for c in body):
            raise ConfigError(f"{where}: not a usable URL (no host, or spaces in it)")
        return MCPServerEntry(name or (url.hostname + (f"_{port}" if port else "")), url=body)
    raise ConfigError(f"{where}: expected 'stdio:<command line>' or an 'http(s)://…/mcp' URL, "
                      "optionally 'NAME=' before it")


def mcp_server_entries(entries: Sequence[str]) -> tuple[MCPServerEntry, ...]:
    """All entries parsed; names made unique (a second 'orders' becomes 'orders_2')."""
    out: list[MCPServerEntry] = []
    taken: set[str] = set()
    for e in entries:
        parsed = parse_mcp_server(e)
        name, n = parsed.name, 1
        while name in taken:
            n += 1
            name = f"{parsed.name}_{n}"
        taken.add(name)
        out.append(dataclasses.replace(parsed, name=name))
    return tuple(out)


def _command_name(command: tuple[str, ...]) -> str:
    """A server's name from its command line: the script or package it runs (python -m orders -> orders)."""
    for word in command:
        if word.startswith("-") or "=" in word:
            continue
        base = re.sub(r"\.(py|js|mjs|ts|exe)$", "", word.rstrip("/").rsplit("/", 1)[-1])
        if base and re.sub(r"[\d.]+$", "", base) not in _LAUNCHERS:
            return base
    return "mcp"
