"""Operators' view: Prometheus metrics after a real call over WebRTC, OpenTelemetry traces per turn
sent to a real (local) OTLP/HTTP receiver, and the LiveKit worker's metrics summed across processes."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from speech import piper_say, trim
from webrtc_client import RTCClient, ServerThread, SignallingError, shared_agent

from rejoinder.agent.metrics import AgentMetrics
from rejoinder.agent.serving import agent_session_factory, metrics_route
from rejoinder.agent.tracing import TurnTracer
from rejoinder.streaming.signalling import ServeConfig

ROOT = Path(__file__).resolve().parent.parent


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Collector:
    """An OTLP/HTTP trace receiver on a loopback port: decodes what the exporter posts."""

    def __init__(self) -> None:
        self.spans: list = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Collector:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        async def traces(request: web.Request) -> web.Response:
            msg = trace_service_pb2.ExportTraceServiceRequest()
            msg.ParseFromString(await request.read())
            for rs in msg.resource_spans:
                for ss in rs.scope_spans:
                    self.spans.extend(ss.spans)
            return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                                content_type="application/x-protobuf")

        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # the port the OS chose
        self.url = f"http://127.0.0.1:{port}/v1/traces"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_metrics_and_traces_count_a_real_call():
    models, cfg = shared_agent()
    metrics = AgentMetrics()
    collector = await Collector().start()
    tracer = TurnTracer(collector.url)
    ended: list[float] = []  # the server's heap trimmer is told of each call that has run (agent.heap)
    factory = agent_session_factory(models, cfg.replace(greeting=""), listeners=[metrics.listener, tracer.listener],
                                    on_call_ended=lambda: ended.append(time.monotonic()))
    srv = ServerThread(ServeConfig(max_sessions=1, connect_timeout_s=10.0, media_timeout_s=5.0), factory,
                       routes=[metrics_route(metrics)], on_refused=metrics.on_refused).start()
    try:
        client = RTCClient(srv.url)
        await client.connect()
        try:
            with pytest.raises(SignallingError) as busy:  # the one slot is taken: refused, and counted
                await RTCClient(srv.url).connect()
            assert busy.value.status == 503
            await client.say(trim(piper_say("What is the capital of France?")), 16_000)
            ev = await client.wait_event(lambda e: e["type"] == "metrics", 60)
        finally:
            await client.close()
        deadline = time.monotonic() + 15
        while srv.active() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http, http.get(srv.url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            got = samples(await r.text())
    finally:
        srv.stop()
    assert len(ended) == 1  # the call that ran; the refused one never had a session
    assert got[("rejoinder_voice_to_voice_seconds_count", ())] == 1
    assert got[("rejoinder_voice_to_voice_seconds_sum", ())] == pytest.approx(ev["voice_to_voice_s"], abs=1e-6)
    for stage in ("asr_final", "end_of_turn", "first_token", "first_audio"):
        assert got[("rejoinder_stage_seconds_count", (("stage", stage),))] == 1, stage
    assert got[("rejoinder_llm_tokens_per_second_count", ())] == 1
    assert got[("rejoinder_turns_total", (("outcome", "completed"),))] == 1
    assert got[("rejoinder_sessions_total", ())] == 1
    assert got[("rejoinder_sessions_active", ())] == 0
    assert got[("rejoinder_sessions_refused_total", (("reason", "busy"),))] == 1
    # The same turn as a trace: a root span and one span per stage, under it, received over OTLP.
    await asyncio.to_thread(tracer.close)  # flushes over HTTP to the collector on this loop
    await collector.stop()
    names = sorted(s.name for s in collector.spans)
    assert "turn" in names and {"asr_final", "end_of_turn", "llm_first_token", "first_audio_sent"} <= set(names)
    root = next(s for s in collector.spans if s.name == "turn")
    children = [s for s in collector.spans if s.parent_span_id == root.span_id]
    assert len(children) == len(names) - 1 and all(s.trace_id == root.trace_id for s in children)
    assert (root.end_time_unix_nano - root.start_time_unix_nano) / 1e9 == pytest.approx(ev["voice_to_voice_s"],
                                                                                           abs=0.01)


async def test_metrics_need_the_token_when_one_is_set():
    from webrtc_client import EchoSession

    metrics = AgentMetrics()
    srv = ServerThread(ServeConfig(token="s3cret"), EchoSession, routes=[metrics_route(metrics)],
                       on_refused=metrics.on_refused).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.url + "/metrics") as r:
                assert r.status == 401
            async with http.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
                got = samples(await r.text())
    finally:
        srv.stop()
    assert got[("rejoinder_sessions_refused_total", (("reason", "unauthorized"),))] == 1


def test_the_livekit_worker_sums_its_job_processes(tmp_path):
    """`rejoinder livekit --metrics-port`: job processes record, the worker process serves the sum."""
    from webrtc_client import _free_port

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]\n"
        "from rejoinder.agent.cli.livekit import serve_metrics\n"
        f"serve_metrics('127.0.0.1', {port}); print('up', flush=True); time.sleep(60)"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    job = (
        "import os, sys; os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1]\n"
        "from rejoinder.agent.metrics import AgentMetrics\n"
        "from rejoinder.agent.events import TurnMetrics, SessionStarted\n"
        "m = AgentMetrics(); m.listener(SessionStarted('s'))\n"
        "m.listener(TurnMetrics('s', turn=1, user_text='hi', agent_text='hello', interrupted=False,"
        " preemptive=False, end_of_turn_prob=0.5, user_speech_end_at=10.0, asr_final_at=10.2, end_of_turn_at=10.25,"
        " llm_first_token_at=10.3, first_clause_at=10.35, first_tts_audio_at=10.4, first_audio_sent_at=10.42))\n")
    try:
        assert server.stdout.readline().strip() == "up"
        for _ in range(2):  # two job processes
            subprocess.run([sys.executable, "-c", job, str(tmp_path)], check=True, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            got = samples(r.read().decode())
    finally:
        server.kill()
        server.wait(10)
    assert got[("rejoinder_voice_to_voice_seconds_count", ())] == 2
    assert got[("rejoinder_voice_to_voice_seconds_sum", ())] == pytest.approx(0.84)
    assert got[("rejoinder_sessions_total", ())] == 2
