"""KV-cache decoding, prefix reuse, cancellation, sampling and bad model files."""
from __future__ import annotations

import threading

import pytest
import torch

from rejoinder.engine import Engine, ModelFileError, SamplingParams
from rejoinder.engine.sampling import filtered_probs
from rejoinder.errors import ConfigError, EngineError, ModelAssetError

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]


def test_incremental_decoding_equals_full_recomputation(engine):
    ids = engine.chat_ids(CHAT)
    engine.reset()
    steps = []
    logits = engine.prefill(ids)
    seq = list(ids)
    for _ in range(12):
        token = int(logits.argmax())
        steps.append(logits)
        seq.append(token)
        logits = engine.prefill(seq)  # a one-token extension of the cached prefix: a pure decode step
        assert engine.last_stats.prefill_tokens == 1
    with torch.no_grad():
        engine.reset()
        full = engine.model(torch.tensor([seq]), 0)[0]  # no cache reuse: everything recomputed
    engine.reset()
    for i, step in enumerate(steps):
        ref = full[len(ids) - 1 + i]
        assert (step - ref).abs().max().item() < 1e-3
        assert step.argmax() == ref.argmax()


def test_prefix_reuse_equals_fresh_prefill(engine):
    turn1 = engine.chat_ids(CHAT)
    reply = list(engine.generate(turn1, SamplingParams(max_new_tokens=8)))
    assert reply
    follow_up = CHAT + [
        {"role": "assistant", "content": engine.tokenizer.decode([e.token_id for e in reply])},
        {"role": "user", "content": "And two more?"},
    ]
    ids2 = engine.chat_ids(follow_up)
    reused_logits = engine.prefill(ids2)
    reused = engine.last_stats.reused_tokens
    assert reused >= len(turn1)  # the whole first turn came from the cache
    assert engine.last_stats.prefill_tokens == len(ids2) - reused
    engine.reset()
    fresh_logits = engine.prefill(ids2)
    assert engine.last_stats.reused_tokens == 0
    assert (reused_logits - fresh_logits).abs().max().item() < 1e-3
    assert reused_logits.argmax() == fresh_logits.argmax()


def test_diverging_prompt_only_reuses_common_prefix(engine):
    a = engine.chat_ids(CHAT)
    b = engine.chat_ids([CHAT[0], {"role": "user", "content": "Something else entirely."}])
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    engine.prefill(a)
    logits = engine.prefill(b)
    assert engine.last_stats.reused_tokens == common
    engine.reset()
    assert (engine.prefill(b) - logits).abs().max().item() < 1e-3


async def test_stream_cancellation_stops_within_one_token(engine):
    stream = engine.stream(CHAT, SamplingParams(max_new_tokens=200, temperature=0.8, seed=3))
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            stream.cancel()
    # the token being computed when cancel() was called may still arrive; no more than that
    assert 3 <= seen <= 4
    assert stream.stats is not None and stream.stats.finish_reason == "cancelled"
    # the engine is immediately usable again
    text = await engine.stream(CHAT, SamplingParams(max_new_tokens=5)).text()
    assert text.strip()


async def test_stream_aclose_from_consumer_stops_generation(engine):
    stream = engine.stream(CHAT, SamplingParams(max_new_tokens=300, temperature=1.0, seed=1))
    async for ev in stream:
        if ev.index == 1:
            break
    await stream.aclose()
    assert stream.stats is None or stream.stats.new_tokens <= 3
    assert engine.generating == 0  # nothing left decoding


def test_sync_generate_cancel_event(engine):
    cancel = threading.Event()
    out = []
    for ev in engine.generate(engine.chat_ids(CHAT), SamplingParams(max_new_tokens=100, temperature=1.0, seed=0),
                              cancel):
        out.append(ev)
        cancel.set()
    assert len(out) == 1
    assert engine.last_stats.finish_reason == "cancelled"


def test_seeded_sampling_is_reproducible_and_varies_with_seed(engine):
    ids = engine.chat_ids(CHAT)

    def run(seed):
        return [e.token_id for e in engine.generate(
            ids, SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=16))]

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in (1, 2, 3, 4)}) > 1


def test_top_k_one_is_greedy(engine):
    ids = engine.chat_ids(CHAT)
    greedy = [e.token_id for e in engine.generate(ids, SamplingParams(max_new_tokens=10))]
    topk1 = [e.token_id for e in engine.generate(
        ids, SamplingParams(temperature=0.9, top_k=1, seed=5, max_new_tokens=10))]
    assert greedy == topk1


def test_filtered_probs_masks_outside_top_k_and_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (p[0, 3:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)[0]
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    keep = int((full.cumsum(0) - full < 0.8).sum())  # smallest prefix reaching 0.8
    assert (p[0, :keep] > 0).all() and (p[0, keep:] == 0).all()
    gen = torch.Generator().manual_seed(0)
    draws = torch.multinomial(p.expand(4000, -1), 1, replacement=True, generator=gen).flatten()
    freq = torch.bincount(draws, minlength=6).float() / 4000
    assert (freq - p[0]).abs().max() < 0.03


def test_generation_stops_on_end_of_turn(engine):
    list(engine.generate(engine.chat_ids([{"role": "user", "content": "Say hello."}]),
                         SamplingParams(max_new_tokens=120)))
    assert engine.last_stats.finish_reason == "stop"
    assert engine.last_stats.new_tokens < 120


def test_context_overflow_is_a_clear_error(engine):
    from rejoinder.engine import ContextOverflow

    with pytest.raises(ContextOverflow, match="does not fit") as err:
        list(engine.generate([1] * (engine.max_seq_len + 5)))
    assert isinstance(err.value, EngineError) and isinstance(err.value, ValueError)


def test_bad_sampling_parameters_are_a_config_error():
    with pytest.raises(ConfigError, match="invalid sampling parameters"):
        SamplingParams(temperature=-1.0)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not a GGUF"),
        (b"PK\x03\x04 definitely a zip file", "not a GGUF"),
        (None, "damaged or truncated|cannot decode|missing"),
    ],
)
def test_bad_gguf_files_raise_model_file_error(tmp_path, llm_path, content, match):
    bad = tmp_path / "bad.gguf"
    if content is None:  # a real GGUF cut short mid-tensor-data
        with open(llm_path, "rb") as f:
            bad.write_bytes(f.read(3_000_000))
    else:
        bad.write_bytes(content)
    with pytest.raises(ModelFileError, match=match) as err:
        Engine.load(bad)
    assert isinstance(err.value, ModelAssetError) and isinstance(err.value, ValueError)


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Engine.load(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="config.json"):
        Engine.load(tmp_path)


def test_config_json_without_a_needed_field_is_a_model_file_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}')
    with pytest.raises(ModelFileError, match="lacks or garbles a field.*num_attention_heads"):
        Engine.load(tmp_path)
