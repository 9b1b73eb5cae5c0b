"""Sessions sharing one engine: per-session KV-cache slots and batched decoding.

Every generation run concurrently (B = 1..4, different prompt lengths, joining and leaving at
different steps, greedy and seeded sampling) must produce exactly the tokens it produces alone --
on random GGUF models (native and eager backends), a random safetensors model and the embedded
SmolLM2 (GQA 9/3). Slots keep each session's prefix across other sessions' turns, are handed over
least-recently-used first, and order each session's requests; cancelling one generation leaves
the others alone; the end-of-turn scorer runs in the session's own slot.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from rejoinder.engine import Engine, EngineOptions, SamplingParams
from rejoinder.engine.end_of_turn import EndOfTurnScorer
from rejoinder.errors import ConfigError, EngineError

gguf = pytest.importorskip("gguf")
from test_engine_gguf_types import Q, write_random_gguf  # noqa: E402


@dataclass(frozen=True)
class Request:
    ids: list[int]
    params: SamplingParams


def requests(vocab: int, lengths=(5, 23, 2, 11), seed: int = 0) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    kinds = [
        SamplingParams(max_new_tokens=30),  # greedy, the longest
        SamplingParams(temperature=0.9, top_k=20, seed=5, max_new_tokens=22),
        SamplingParams(max_new_tokens=9),
        SamplingParams(temperature=1.1, top_p=0.9, seed=9, max_new_tokens=16),
    ]
    return [Request(torch.randint(0, vocab - 2, (n,), generator=g).tolist(), p) for n, p in zip(lengths, kinds)]


def alone(engine: Engine, reqs: list[Request]) -> list[list[int]]:
    """Each request by itself, one after another, each in a fresh slot."""
    out = []
    for i, r in enumerate(reqs):
        out.append([ev.token_id for ev in engine.generate(r.ids, r.params, slot=f"alone-{i}")])
        engine.release_slot(f"alone-{i}")
    return out


class Gate:
    """Holds the engine thread in a job until opened, so requests queue up behind it."""

    def __init__(self, engine: Engine) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        self.job = asyncio.ensure_future(engine.run_async(self._hold, slot="gate"))

    def _hold(self) -> None:
        self.entered.set()
        self.opened.wait(60)

    async def __aenter__(self) -> Gate:
        while not self.entered.is_set():
            await asyncio.sleep(0.001)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.opened.set()
        await self.job


async def collect(stream) -> list[int]:
    return [ev.token_id async for ev in stream]


async def together(engine: Engine, reqs: list[Request], tag: str) -> list[list[int]]:
    """All requests queued while the engine is held: they start in one turn and step as one batch."""
    async with Gate(engine):
        streams = [engine.stream(r.ids, r.params, slot=f"{tag}-{i}") for i, r in enumerate(reqs)]
    return list(await asyncio.gather(*map(collect, streams)))


async def staggered(engine: Engine, reqs: list[Request], tag: str) -> list[list[int]]:
    """Request i joins once request 0 has produced ~3 i tokens (the engine held while it is queued)."""
    first = engine.stream(reqs[0].ids, reqs[0].params, slot=f"{tag}-0")
    seen: list[int] = []

    async def lead() -> list[int]:
        async for ev in first:
            seen.append(ev.token_id)
        return seen

    tasks = [asyncio.ensure_future(lead())]
    for i, r in enumerate(reqs[1:], start=1):
        while len(seen) < 3 * i and not tasks[0].done():
            await asyncio.sleep(0.0005)
        async with Gate(engine):
            tasks.append(asyncio.ensure_future(collect(engine.stream(r.ids, r.params, slot=f"{tag}-{i}"))))
    return list(await asyncio.gather(*tasks))


def release_all(engine: Engine, tag: str, n: int) -> None:
    for i in range(n):
        engine.release_slot(f"{tag}-{i}")


@pytest.fixture(scope="module", params=[("Q4_0", "native"), ("Q8_0", "native"), ("F32", "native"),
                                        ("Q4_1", "eager")], ids=lambda p: f"{p[0]}-{p[1]}")
def gguf_engine(request, tmp_path_factory):
    qtype, backend = request.param
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{qtype}.gguf"
    write_random_gguf(path, getattr(Q, qtype), seed=3)
    eng = Engine.load(path, EngineOptions(max_seq_len=96, backend=backend, threads=2, kv_slots=4))
    assert eng.backend == backend
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-Q4_1.gguf"
    write_random_gguf(path, Q.Q4_1, seed=4)
    return path


def fresh(path, kv_slots: int) -> Engine:
    return Engine.load(path, EngineOptions(max_seq_len=96, threads=2, kv_slots=kv_slots))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
async def test_batched_generations_equal_each_alone(gguf_engine, n):
    reqs = requests(gguf_engine.model.cfg.vocab_size)[:n]
    want = alone(gguf_engine, reqs)
    before = gguf_engine.batch_histogram()
    assert await together(gguf_engine, reqs, "all") == want
    after = gguf_engine.batch_histogram()
    assert after.get(n, 0) > before.get(n, 0)  # they really shared decode steps, n at a time
    release_all(gguf_engine, "all", n)
    if n > 1:
        assert await staggered(gguf_engine, reqs, "join") == want
        assert max(k for k, v in gguf_engine.batch_histogram().items() if v > after.get(k, 0)) >= 2
        release_all(gguf_engine, "join", n)


def test_batched_generations_equal_each_alone_on_a_safetensors_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_engine_reference import _write_tokenizer

    torch.manual_seed(0)
    vocab = _write_tokenizer(tmp_path)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=vocab - 1)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(tmp_path, safe_serialization=True)
    eng = Engine.load(tmp_path, EngineOptions(max_seq_len=96, threads=2, kv_slots=3))
    try:
        assert eng.backend == "native"  # fp32 weights: the C step reads them as they are
        reqs = requests(vocab, lengths=(7, 3, 15))[:3]
        assert asyncio.run(together(eng, reqs, "st")) == alone(eng, reqs)
    finally:
        eng.close()


async def test_embedded_model_batched_equals_alone(engine):
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "You are a terse phone agent."},
         {"role": "user", "content": "My internet is down again."}],
        [{"role": "user", "content": "Count from one to twenty in words."}],
        [{"role": "user", "content": "Give me one tip for sleeping better."}],
    ]
    params = [SamplingParams(max_new_tokens=24), SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11,
                                                                max_new_tokens=20),
              SamplingParams(max_new_tokens=12), SamplingParams(temperature=0.7, seed=2, max_new_tokens=16)]
    reqs = [Request(engine.chat_ids(c), p) for c, p in zip(convs, params)]
    want = alone(engine, reqs)
    assert all(len(w) > 5 for w in want)
    assert await together(engine, reqs, "emb") == want
    release_all(engine, "emb", 4)
    assert await staggered(engine, reqs, "emb-join") == want
    release_all(engine, "emb-join", 4)


# ------------------------------------------------------------------------------- slots


def test_a_follow_up_prefills_only_its_new_tokens_whatever_ran_between(engine):
    params = SamplingParams(max_new_tokens=12)
    histories = {"A": [{"role": "user", "content": "Give me one tip for sleeping better."}],
                 "B": [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}]}
    for key in "AB":  # first turns, one after the other
        answer = engine.tokenizer.decode([e.token_id for e in engine.generate(engine.chat_ids(histories[key]),
                                                                              params, slot=key)])
        histories[key] += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another one?"}]
    follow_up = engine.chat_ids(histories["A"])  # A's second turn, after B's first
    list(engine.generate(follow_up, params, slot="A"))
    assert engine.last_stats.prefill_tokens < 16 < engine.last_stats.reused_tokens
    for key in "AB":
        engine.release_slot(key)


def test_a_new_slot_starts_from_the_prefix_another_slot_holds(engine):
    """A new session's prompt shares the persona with sessions before it: its slot starts from a copy
    of their K/V, and what it computes is what a prefill from scratch computes."""
    persona = [{"role": "system", "content": "You are a patient assistant for a bicycle shop. Keep answers short."}]
    first = engine.chat_ids(persona + [{"role": "user", "content": "Do you repair brakes?"}])
    second = engine.chat_ids(persona + [{"role": "user", "content": "When do you open on Sunday?"}])
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 16
    engine.reset()
    engine.next_token_probs(first, slot="donor")
    seeded = engine.next_token_probs(second, slot="new")
    assert engine.last_stats.reused_tokens >= shared - 1, engine.last_stats
    engine.release_slot("new")
    engine.reset()  # nothing cached anywhere: the same prompt from scratch
    engine.release_slot("donor")
    scratch = engine.next_token_probs(second, slot="scratch")
    assert engine.last_stats.reused_tokens == 0
    assert torch.allclose(seeded, scratch, atol=1e-5), (seeded - scratch).abs().max()
    assert int(seeded.argmax()) == int(scratch.argmax())
    engine.release_slot("scratch")


async def test_a_follow_up_runs_while_another_session_generates(engine):
    long = engine.stream([{"role": "user", "content": "Count from one to one hundred in words."}],
                         SamplingParams(max_new_tokens=120), slot="talker")
    ids = engine.chat_ids([{"role": "user", "content": "What is two plus two?"}])
    engine.prefill(ids, slot="listener")
    async for ev in long:
        if ev.index == 2:
            break
    extra = engine.tokenizer.encode(" Four")
    probs = await engine.run_async(partial(engine.next_token_probs, slot="listener"), ids + extra, slot="listener")
    assert engine.last_stats.reused_tokens == len(ids) and engine.last_stats.prefill_tokens == len(extra)
    assert long._generation is not None and not long._generation.done.is_set()  # it ran between steps
    await long.aclose()
    fresh_probs = engine.next_token_probs(ids + extra, slot="fresh")  # no prefix reuse
    torch.testing.assert_close(probs, fresh_probs, atol=1e-5, rtol=1e-3)
    for key in ("talker", "listener", "fresh"):
        engine.release_slot(key)


def test_least_recently_used_slot_is_handed_over(tiny_gguf):
    eng = fresh(tiny_gguf, kv_slots=2)
    try:
        a, b, c = ([i + 1] * 6 for i in range(3))
        eng.prefill(a, slot="a")
        eng.prefill(b, slot="b")
        eng.prefill(a + [5], slot="a")  # a is used again: b is now the least recently used
        eng.prefill(c, slot="c")
        assert eng.slot_keys() == ["a", "c"]
        eng.prefill(a + [5, 6], slot="a")
        assert eng.last_stats.reused_tokens == 7  # a kept its prefix
        eng.prefill(b + [1], slot="b")
        assert eng.last_stats.reused_tokens == 0  # b lost its slot
        eng.release_slot("a")
        eng.prefill(a, slot="a")  # queued after the release: a starts from scratch
        assert eng.last_stats.reused_tokens == 0 and eng.slot_keys() == ["b", "a"]
    finally:
        eng.close()


async def test_more_generations_than_slots_wait_for_one(tiny_gguf):
    eng = fresh(tiny_gguf, kv_slots=2)
    try:
        reqs = requests(eng.model.cfg.vocab_size)[:3]
        want = alone(eng, reqs)
        assert await together(eng, reqs, "more") == want
        assert max(eng.batch_histogram()) == 2
    finally:
        eng.close()


async def test_requests_for_one_slot_run_in_order_and_reuse_each_other(gguf_engine):
    first = requests(gguf_engine.model.cfg.vocab_size)[0]
    async with Gate(gguf_engine):  # both queued at once: the second waits for the first
        s1 = gguf_engine.stream(first.ids, first.params, slot="same")
        s2 = gguf_engine.stream(first.ids + [7, 8], SamplingParams(max_new_tokens=4), slot="same")
    await asyncio.gather(collect(s1), collect(s2))
    assert s1.stats is not None and s1.stats.reused_tokens == 0
    assert s2.stats is not None and s2.stats.reused_tokens >= len(first.ids)  # s1 had filled the slot
    gguf_engine.release_slot("same")


async def test_cancelling_one_generation_leaves_the_others_alone(gguf_engine):
    reqs = requests(gguf_engine.model.cfg.vocab_size)[:3]
    want = alone(gguf_engine, reqs)
    async with Gate(gguf_engine):
        streams = [gguf_engine.stream(r.ids, r.params, slot=f"cx-{i}") for i, r in enumerate(reqs)]
    streams[0].cancel()
    got = await asyncio.gather(*map(collect, streams))
    assert streams[0].stats.finish_reason == "cancelled" and got[0] == want[0][: len(got[0])]
    assert len(got[0]) < len(want[0])
    assert got[1:] == want[1:]
    release_all(gguf_engine, "cx", 3)


async def test_jobs_wait_for_their_own_slot_only(engine):
    talk = engine.stream([{"role": "user", "content": "Count from one to one hundred in words."}],
                         SamplingParams(max_new_tokens=150), slot="busy")
    async for ev in talk:
        if ev.index == 1:
            break
    gen = talk._generation
    assert gen is not None
    assert await engine.run_async(gen.done.is_set, slot="other") is False  # between the steps of "busy"
    with pytest.raises(EngineError, match="'busy' is generating"):  # a job must not write a busy slot
        await engine.run_async(partial(engine.prefill, slot="busy"), [1, 2, 3], slot="other2")
    talk.cancel()
    assert await engine.run_async(gen.done.is_set, slot="busy") is True  # after "busy" is done
    for key in ("busy", "other", "other2"):
        engine.release_slot(key)


async def test_end_of_turn_scores_in_the_sessions_slot(engine):
    scorer = EndOfTurnScorer.shared(engine)
    history = [{"role": "system", "content": "You are a helpful voice assistant."}]
    text = "What time is it"
    p = await scorer.ascore(history, text, slot="eot")
    assert p == pytest.approx(await scorer.ascore(history, text), rel=1e-4)  # same score, default slot
    eot_ids = scorer.prompt_ids(history, text)
    answer = engine.stream(history + [{"role": "user", "content": text}], SamplingParams(max_new_tokens=3),
                           slot="eot")
    await answer.text()
    assert answer.stats is not None and answer.stats.reused_tokens >= len(eot_ids) - 1
    engine.release_slot("eot")


# ------------------------------------------------------------------------------- life cycle


async def test_close_cancels_what_runs_and_refuses_more(tiny_gguf):
    eng = fresh(tiny_gguf, kv_slots=2)
    eng.tokenizer.stop_ids = set()
    async with Gate(eng):
        running = eng.stream([1, 2, 3], SamplingParams(max_new_tokens=90), slot="x")
        queued = eng.stream([1, 2], SamplingParams(max_new_tokens=5), slot="x")  # waits for "x"
    async for _ in running:
        break
    gate = Gate(eng)
    await gate.__aenter__()  # the engine thread is held between two steps of `running`
    closing = asyncio.get_running_loop().run_in_executor(None, eng.close)
    await asyncio.sleep(0.05)
    await gate.__aexit__()
    await closing
    await collect(running)
    assert running.stats.finish_reason == "cancelled" and running.stats.new_tokens < 90
    assert await collect(queued) == [] and queued.stats.finish_reason == "cancelled"
    with pytest.raises(EngineError, match="closed"):
        eng.stream([1], SamplingParams())
    with pytest.raises(EngineError, match="closed"):
        eng.prefill([1, 2])


def test_slots_are_configured_and_sized(engine, tiny_gguf):
    with pytest.raises(ConfigError, match="kv_slots must be at least 1"):
        Engine.load(tiny_gguf, EngineOptions(kv_slots=0))
    cfg = engine.model.cfg  # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32
    assert engine.kv_slot_bytes == 2 * 30 * 3 * 64 * engine.max_seq_len * 4
    assert engine.model.layers[0].attn.cache.k.shape == (4, cfg.n_kv_heads, engine.max_seq_len, cfg.head_dim)


async def test_a_held_generation_waits_while_the_others_run_then_resumes_where_it_was(gguf_engine):
    """`TokenStream.hold` (a voice answer while its audio is synthesised): no step runs for the held
    generation, the others decode on; released (or once the hold runs out) it goes on, token for
    token what it makes alone."""
    reqs = requests(gguf_engine.model.cfg.vocab_size)[:3]
    want = alone(gguf_engine, reqs)
    async with Gate(gguf_engine):
        held = gguf_engine.stream(reqs[0].ids, reqs[0].params, slot="hold-0")
        other = gguf_engine.stream(reqs[1].ids, reqs[1].params, slot="hold-1")
        held.hold(60.0)
    got: list[int] = []

    async def read() -> None:
        async for ev in held:
            got.append(ev.token_id)

    reader = asyncio.ensure_future(read())
    assert await collect(other) == want[1]
    await asyncio.sleep(0.1)
    assert len(got) <= 1, got  # its first token comes with its prefill; no step since
    held.release()
    await asyncio.wait_for(reader, 30)
    assert got == want[0]
    # A hold that is never released runs out by itself.
    t0 = asyncio.get_running_loop().time()
    async with Gate(gguf_engine):
        lapse = gguf_engine.stream(reqs[2].ids, reqs[2].params, slot="hold-2")
        lapse.hold(0.3)
    assert await asyncio.wait_for(collect(lapse), 30) == want[2]
    assert asyncio.get_running_loop().time() - t0 >= 0.25
    release_all(gguf_engine, "hold", 3)
