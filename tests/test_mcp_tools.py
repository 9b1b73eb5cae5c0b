"""Tools from Model Context Protocol servers, on real servers and the real session and models.

The MCP server is a small script written here on the SDK's own server API (`MCPServer`), run as a
separate process over stdio (spawned by the agent) or over streamable HTTP on a loopback port
(started by the test). Its `lookup_order` answers with a fixed fact the model cannot know; its
`slow` tool sleeps. Servers are killed for real (SIGKILL by pid) to show what a caller gets when one
dies, and every test checks that no server process outlives it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from agent_harness import live_session, wait_for
from speech import have_espeak

from rejoinder.agent.config import AgentConfig, env_for
from rejoinder.agent.control import run_command
from rejoinder.agent.events import SessionState
from rejoinder.agent.mcp_tools import CLOSE_TIMEOUT_S, MCPTools
from rejoinder.agent.session import Session
from rejoinder.agent.tools import ToolCall, ToolError, ToolRegistry
from rejoinder.errors import ConfigError
from rejoinder.streaming.audio import resample
from rejoinder.streaming.text_metrics import normalized_words, word_error_rate
from rejoinder.streaming.transport import InProcessTransport

FACT = "shipped on Monday from the Leeds warehouse and arrives on Thursday"

SERVER = f'''
import argparse, asyncio, os, signal, sys, time
from mcp.server.mcpserver import MCPServer

p = argparse.ArgumentParser()
p.add_argument("--pid-file", required=True)
p.add_argument("--refuse-if", default="")  # exit at once while this file exists (a server that stays down)
p.add_argument("--http", type=int, default=0)
p.add_argument("--stubborn", action="store_true")  # ignores SIGTERM and stays after its input closes
a = p.parse_args()
if a.refuse_if and os.path.exists(a.refuse_if):
    sys.exit(3)
with open(a.pid_file, "a") as f:
    f.write(f"{{os.getpid()}}\\n")

app = MCPServer("orders", log_level="WARNING")

@app.tool()
def lookup_order(order_id: str) -> str:
    """Look up where a customer's order is, by its order number."""
    return f"Order {{order_id}} {FACT}."

@app.tool()
async def slow(seconds: float = 120.0) -> str:
    """Check the warehouse stock (takes a while)."""
    await asyncio.sleep(seconds)
    return "in stock"

if a.stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if a.http:
    app.run("streamable-http", host="127.0.0.1", port=a.http)
else:
    app.run()
if a.stubborn:
    time.sleep(3600)
'''

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mcp") / "orders_server.py"
    path.write_text(SERVER)
    return path


def pids(pid_file: Path) -> list[int]:
    return [int(x) for x in pid_file.read_text().split()] if pid_file.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stdio_entry(script: Path, pid_file: Path, *extra: str) -> str:
    return f"orders=stdio:{sys.executable} {script} --pid-file {pid_file} {' '.join(extra)}".strip()


@contextlib.contextmanager
def http_server(script: Path, pid_file: Path, port: int):
    proc = subprocess.Popen([sys.executable, str(script), "--pid-file", str(pid_file), "--http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            assert proc.poll() is None, "the HTTP MCP server exited"
            time.sleep(0.1)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def call_config(**call) -> AgentConfig:
    cfg = AgentConfig.from_env(max_new_tokens=40)
    return cfg.replace(call=dataclasses.replace(cfg.call, **call))


@contextlib.asynccontextmanager
async def call_with_mcp(models, cfg: AgentConfig):
    """A live session with the MCP tools of `cfg`, as `rejoinder serve`/`talk` give them."""
    async with MCPTools.from_settings(cfg.call) as mcp:
        async with live_session(models, cfg, tools=mcp.tools(), setup=mcp.attach) as (session, transport, _):
            yield session, transport, mcp
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("rejoinder-mcp")], "a runner outlived close"


async def ask(session: Session, text: str, turns_before: int, timeout: float = 60) -> None:
    assert (await run_command(session, "user_text", {"text": text}))["ok"]
    assert await wait_for(lambda: len(session.turns) > turns_before and session.state == SessionState.LISTENING,
                          timeout), f"no answer to {text!r}"


def spoken_audio(transport: InProcessTransport, t0: float, t1: float) -> np.ndarray:
    """What the agent sent between t0 and t1, as 16 kHz float32 (for Whisper)."""
    frames = [s.frame for s in transport.sent_audio if t0 <= s.sent_at <= t1]
    if not frames:
        return np.zeros(0, np.float32)
    return resample(np.concatenate([f.to_float_mono() for f in frames]), frames[0].sample_rate, 16_000)


# --- configuration --------------------------------------------------------------------------------------


def test_config_entries_parse_and_a_bad_entry_is_a_one_line_config_error():
    cfg = AgentConfig.from_env({"REJOINDER_MCP_SERVERS": "stdio:python -m orders_server --ids a,b, "
                                "billing=https://tools.example.com/mcp,stdio:npx -y @acme/crm-mcp",
                                "REJOINDER_MCP_TIMEOUT_S": "2.5"})
    orders, billing, crm = cfg.call.mcp
    assert orders.name == "orders_server" and orders.command == ("python", "-m", "orders_server", "--ids", "a,b")
    assert (billing.name, billing.url, billing.transport) == ("billing", "https://tools.example.com/mcp", "http")
    assert crm.name == "crm-mcp" and cfg.call.mcp_timeout_s == 2.5
    # LiveKit job processes get the configuration as environment variables: the entries survive it.
    assert AgentConfig.from_env(env_for(cfg, ("call",))).call.mcp == cfg.call.mcp
    for bad, why in [("orders.example.com/mcp", "expected 'stdio:"), ("stdio:", "no command"),
                     ("stdio:python 'unclosed", "cannot split"), ("http://", "not a usable URL")]:
        with pytest.raises(ConfigError, match=why) as err:
            AgentConfig.from_env({"REJOINDER_MCP_SERVERS": bad})
        assert "\n" not in str(err.value) and "--mcp-server" in str(err.value)
    with pytest.raises(ConfigError, match="mcp-timeout-s"):
        AgentConfig.from_env({"REJOINDER_MCP_TIMEOUT_S": "0"})


def test_a_bad_mcp_server_flag_fails_the_command_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rejoinder.agent.cli", "talk", "--in", str(tmp_path / "x.wav"),
                           "--out", str(tmp_path / "y.wav"), "--mcp-server", "ftp://nowhere"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rejoinder: error:") and "ftp://nowhere" in last and "--mcp-server" in last, proc.stderr


# --- the MCP connection set without a session ---------------------------------------------------------------


async def test_streamable_http_server_lists_and_calls_tools_and_comes_back_after_a_restart(server_script, tmp_path):
    port = free_port()
    pid_file = tmp_path / "pids"
    cfg = call_config(mcp_servers=(f"http://127.0.0.1:{port}/mcp",), mcp_timeout_s=20.0, mcp_connect_timeout_s=60.0)
    with http_server(server_script, pid_file, port):
        async with MCPTools.from_settings(cfg.call) as mcp:
            registry = ToolRegistry(mcp.tools())
            assert set(registry.tools) == {"lookup_order", "slow"}
            assert registry.tools["lookup_order"].parameters["required"] == ["order_id"]
            assert "lookup_order" in registry.system_prompt() and "order number" in registry.system_prompt()
            assert await registry.run(ToolCall("lookup_order", {"order_id": "A-17"})) == f"Order A-17 {FACT}."
            (server,) = mcp.servers
            assert server.name == f"127.0.0.1_{port}"
        assert not server.up
    # A server that goes away: a call fails at once, naming it; once it is back, calls work again.
    async with contextlib.AsyncExitStack() as stack:
        with http_server(server_script, pid_file, port) as proc:
            mcp = await stack.enter_async_context(MCPTools.from_settings(cfg.call))
            registry = ToolRegistry(mcp.tools())
            assert await registry.run(ToolCall("lookup_order", {"order_id": "1"})) == f"Order 1 {FACT}."
            proc.kill()
            proc.wait(10)
            t0 = time.monotonic()
            with pytest.raises(ToolError) as err:
                await registry.run(ToolCall("lookup_order", {"order_id": "2"}))
            assert str(err.value).startswith(f"MCP server '127.0.0.1_{port}' went away during lookup_order"), err.value
            assert time.monotonic() - t0 < 10, "a dead HTTP server was waited for"
            assert await wait_for(lambda: not mcp.servers[0].up, 10)
        with http_server(server_script, pid_file, port):
            assert await wait_for(lambda: mcp.servers[0].up, 90), mcp.summary()
            assert await registry.run(ToolCall("lookup_order", {"order_id": "3"})) == f"Order 3 {FACT}."
    assert not any(alive(p) for p in pids(pid_file))


async def test_close_never_hangs_on_a_stubborn_server_and_leaves_no_process(server_script, tmp_path):
    pid_file = tmp_path / "pids"
    cfg = call_config(mcp_servers=(stdio_entry(server_script, pid_file, "--stubborn"),), mcp_connect_timeout_s=60.0)
    mcp = MCPTools.from_settings(cfg.call)
    await mcp.ready()
    assert mcp.servers[0].up, mcp.summary()
    (pid,) = pids(pid_file)
    t0 = time.monotonic()
    await mcp.aclose()
    took = time.monotonic() - t0
    assert took < CLOSE_TIMEOUT_S + 2, took
    assert await wait_for(lambda: not alive(pid), 5), "the server process outlived close"


# --- on the live session -----------------------------------------------------------------------------------


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_a_forced_mcp_call_round_trips_into_a_spoken_answer(models, server_script, tmp_path):
    pid_file = tmp_path / "pids"
    cfg = call_config(mcp_servers=(stdio_entry(server_script, pid_file),), mcp_connect_timeout_s=60.0)
    async with call_with_mcp(models, cfg) as (session, transport, mcp):
        assert {"lookup_order", "slow"} <= set(session.tools.tools)
        system = session.conversation.system_message()["content"]
        assert '"name": "lookup_order"' in system and "order number" in system
        assert (await run_command(session, "force_tool", {"name": "lookup_order"}))["ok"]
        t0 = time.monotonic()
        await ask(session, "Where is my order number 4417?", 0)
        t1 = time.monotonic()
    (ev,) = transport.events_of("tool_call")
    assert ev["name"] == "lookup_order" and ev["error"] is None, ev
    assert ev["result"] == f"Order {ev['arguments']['order_id']} {FACT}.", ev  # written by the server
    assert not transport.events_of("error")
    tool_msg = next(m for m in session.conversation.turns if m["role"] == "tool")
    assert "Leeds warehouse" in tool_msg["content"]
    # The follow-up answer was generated after the result and spoken: the agent's audio says it.
    follow = session.turns[-1]
    assert follow.tool_calls == ("lookup_order",) and len(normalized_words(follow.agent_text)) >= 2, follow
    heard = models.asr.transcribe(spoken_audio(transport, t0, t1 + 1)).text
    assert word_error_rate(follow.agent_text, heard) <= 0.5, (follow.agent_text, heard)
    assert not any(alive(p) for p in pids(pid_file))


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_a_slow_call_times_out_a_killed_server_is_reported_and_the_call_goes_on(models, server_script, tmp_path):
    pid_file, stay_down = tmp_path / "pids", tmp_path / "stay-down"
    cfg = call_config(mcp_servers=(stdio_entry(server_script, pid_file, "--refuse-if", str(stay_down)),),
                      mcp_timeout_s=4.0, mcp_connect_timeout_s=60.0, hold_after_s=0.5)
    async with call_with_mcp(models, cfg) as (session, transport, mcp):
        # 1. A call that takes longer than --mcp-timeout-s: the caller hears hold audio, then an answer.
        assert (await run_command(session, "force_tool", {"name": "slow"}))["ok"]
        t0 = time.monotonic()
        await ask(session, "Is the blue kettle in stock?", 0)
        timed_out = transport.events_of("tool_call")[-1]
        assert timed_out["error"] == "MCP server 'orders' did not answer slow within 4 s", timed_out
        assert timed_out["at"] - t0 >= 4.0
        assert [(e["on"], e["reason"]) for e in transport.events_of("hold")][:2] == [(True, "tool"), (False, "tool")]
        # 2. The server dies in the middle of a call (and stays down): told at once, not after the timeout.
        assert (await run_command(session, "force_tool", {"name": "slow"}))["ok"]
        assert (await run_command(session, "user_text", {"text": "Can you check the red kettle too?"}))["ok"]
        assert await wait_for(lambda: session.speaker.holding == "tool", 40)
        stay_down.touch()
        (pid,) = pids(pid_file)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        assert await wait_for(lambda: len(session.turns) == 2 and session.state == SessionState.LISTENING, 60)
        # The first call to end after the kill is the one in flight (the follow-up may try again).
        died = [e for e in transport.events_of("tool_call") if e["at"] >= t_kill][0]
        assert died["error"].startswith("MCP server 'orders' went away during slow"), transport.events_of("tool_call")
        assert died["at"] - t_kill < 3.0
        (gone,) = [e for e in transport.events_of("error") if e["where"] == "mcp"]
        assert gone["message"].startswith("MCP server 'orders' went away (the server exited)") and not gone["fatal"]
        # 3. A call while it is down fails fast, with the reason; the model is told and answers.
        assert (await run_command(session, "force_tool", {"name": "lookup_order"}))["ok"]
        await ask(session, "Where is order 12?", 2)
        down = transport.events_of("tool_call")[-1]
        assert down["error"] == "MCP server 'orders' is not connected (the server exited)", down
        # 4. And the next question is answered as usual.
        await ask(session, "What is the capital of France?", 3)
    assert session.state == SessionState.ENDED and session.end_reason == "hangup"
    assert len(session.turns) == 4 and all(len(normalized_words(t.agent_text)) >= 2 for t in session.turns), \
        [t.agent_text for t in session.turns]
    for msg in [m for m in session.conversation.turns if m["role"] == "tool"]:
        assert '"error"' in msg["content"]  # each failure went to the model as the tool's result
    assert not any(alive(p) for p in pids(pid_file))


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
async def test_servers_down_at_start_are_an_error_event_and_the_session_answers(models, tmp_path):
    port = free_port()  # nothing listens there
    cfg = call_config(mcp_servers=(f"stdio:{tmp_path}/no-such-server --flag", f"crm=http://127.0.0.1:{port}/mcp"),
                      mcp_connect_timeout_s=20.0)
    t0 = time.monotonic()
    async with call_with_mcp(models, cfg) as (session, transport, mcp):
        assert time.monotonic() - t0 < 15, "a server that cannot start held the session up"
        assert not mcp.tools() and not session.tools
        await ask(session, "What is the capital of France?", 0)
    errors = {e["message"].split("'")[1]: e for e in transport.events_of("error") if e["where"] == "mcp"}
    assert set(errors) == {"no-such-server", "crm"}, errors
    missing = errors["no-such-server"]["message"]
    assert "unavailable" in missing and "No such file" in missing, missing
    assert "ConnectError" in errors["crm"]["message"]
    assert len(session.turns) == 1 and len(normalized_words(session.turns[0].agent_text)) >= 2
