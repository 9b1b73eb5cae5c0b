"""What an ended call leaves behind in a long-running server process.

A session is a web of back-references (roles hold the session, the session holds them), so what it
owns is freed by Python's cyclic collector, whose full passes come rarely in a process holding
models (hundreds of thousands of long-lived objects). Whatever a session allocates per call waits
that long: a Silero ONNX session per call (~11 MiB native) made `rejoinder serve` grow ~3 MiB per
call for its first ~80 calls (bench/load.py --soak --call greeting). Sessions now stream on the one
loaded network; this checks, with the collector off (the worst case: nothing cyclic is freed), that
calls add no ONNX sessions and little memory.
"""
from __future__ import annotations

import asyncio
import gc

import pytest
from agent_harness import Mic, wait_for

from rejoinder.agent import heap
from rejoinder.agent.config import AgentConfig
from rejoinder.agent.events import SessionState
from rejoinder.agent.models import Models
from rejoinder.agent.session import Session
from rejoinder.streaming.transport import InProcessTransport

pytestmark = pytest.mark.slow

CALLS = 4


@pytest.fixture(scope="module")
def models():
    m = Models(AgentConfig.from_env())
    yield m
    m.close()


def onnx_sessions() -> int:
    return sum(type(o).__name__ == "InferenceSession" for o in gc.get_objects())


def heap_in_use_mib() -> float | None:
    st = heap.stats()
    return st.in_use / 2**20 if st is not None else None


async def one_call(models: Models, cfg: AgentConfig) -> None:
    """A short call: the session starts listening, hears a second of silence, the caller hangs up."""
    transport = InProcessTransport(output_sample_rate=models.tts.sample_rate)
    mic = Mic(transport)
    session = Session(models, cfg, transport, greeting="")
    task = asyncio.create_task(session.run())
    mic.start()
    try:
        assert await wait_for(lambda: session.state == SessionState.LISTENING, 10)
        await asyncio.sleep(1.0)
    finally:
        await mic.stop()
        await asyncio.wait_for(task, 30)
    assert session.state == SessionState.ENDED


async def test_ended_calls_leave_no_onnx_sessions_behind(models):
    cfg = AgentConfig.from_env()
    await one_call(models, cfg)  # first call: lazy one-time allocations
    gc.collect()
    gc.disable()
    try:
        sessions0, heap0 = onnx_sessions(), heap_in_use_mib()
        for _ in range(CALLS):
            await one_call(models, cfg)
        sessions1, heap1 = onnx_sessions(), heap_in_use_mib()
    finally:
        gc.enable()
        gc.collect()
    assert sessions1 <= sessions0, f"{sessions1 - sessions0} ONNX sessions more after {CALLS} calls"
    if heap0 is not None:
        # Loose: what stays is a call's Python objects and buffers (~1-2 MiB); one Silero ONNX
        # session per call alone was ~11 MiB.
        assert heap1 - heap0 < 8.0 * CALLS, f"the heap grew {heap1 - heap0:.1f} MiB over {CALLS} calls"
