"""Our decoder against an independent implementation (HF transformers) on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

from rejoinder.engine import Engine, EngineOptions

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise voice assistant."},
        {"role": "user", "content": "Tell me a fun fact about octopuses, in 2 sentences."},
    ],
    [{"role": "user", "content": "Compute 12345 + 678, then say ünïcödé wörds and emoji 🎉."}],
]


@pytest.mark.parametrize("messages", PROMPTS)
def test_gguf_next_token_logits_match_transformers(engine, hf_gguf_reference, messages):
    ref_model, _ = hf_gguf_reference
    ids = engine.chat_ids(messages)
    engine.reset()
    ours = engine.prefill(ids)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0, -1].float()
    assert torch.argmax(ours) == torch.argmax(ref)
    assert (ours - ref).abs().max().item() < 2e-3


def test_gguf_all_positions_match_transformers(engine, hf_gguf_reference):
    ref_model, _ = hf_gguf_reference
    ids = engine.chat_ids(PROMPTS[1])
    with torch.no_grad():
        ours = engine.model(torch.tensor([ids]), 0)[0]
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert (ours - ref).abs().max().item() < 2e-3
    engine.reset()  # we wrote the cache behind the engine's back


def test_tokenizer_and_chat_template_match_transformers(engine, hf_gguf_reference):
    _, ref_tok = hf_gguf_reference
    for text in [
        "Hello, my name is 12345 and I like 3.14 pies.",
        "  leading spaces, tabs\tand\nnewlines  ",
        "Ünïcödé, emoji 🎉 and <|im_start|> specials<|im_end|>",
        "don't, I'll, we've — quotes \"here\"",
    ]:
        assert engine.tokenizer.encode(text) == ref_tok.encode(text, add_special_tokens=False), text
    for messages in PROMPTS:
        ours = engine.tokenizer.render_chat(messages)
        ref = ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == ref


def test_greedy_generation_matches_transformers(engine, hf_gguf_reference):
    ref_model, _ = hf_gguf_reference
    ids = engine.chat_ids(PROMPTS[0])
    engine.reset()
    ours = [ev.token_id for ev in engine.generate(ids)]
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([ids]), max_new_tokens=len(ours) + 1, do_sample=False)
    ref = out[0, len(ids):].tolist()
    assert ours == ref[: len(ours)]
    assert engine.last_stats.finish_reason == "stop"
    assert ref[len(ours)] in engine.tokenizer.stop_ids


# --- a small random safetensors model written by the test ------------------------------------------


def _write_tokenizer(folder):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tk.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    return tk.get_vocab_size()


CASES = {
    "llama_gqa_untied": dict(arch="llama", heads=6, kv=2, tie=False, scaling=None),
    "llama_mha_tied_llama3_rope": dict(
        arch="llama",
        heads=4,
        kv=4,
        tie=True,
        scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64},
    ),
    "qwen2_bias_gqa3": dict(arch="qwen2", heads=6, kv=2, tie=True, scaling=None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_safetensors_model_matches_transformers(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    spec = CASES[case]
    torch.manual_seed(0)
    vocab = _write_tokenizer(tmp_path)
    common = dict(
        vocab_size=vocab,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=512,
        rope_theta=5000.0,
        tie_word_embeddings=spec["tie"],
        eos_token_id=vocab - 1,
    )
    if spec["arch"] == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        ref = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, rope_scaling=spec["scaling"])
        ref = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms to 1; random norms make the test sharper
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.0))
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
    ref.eval().save_pretrained(tmp_path, safe_serialization=True)

    eng = Engine.load(tmp_path, EngineOptions(max_seq_len=256))
    try:
        messages = [{"role": "user", "content": "hi there, how are you doing today? " * 3}]
        ids = eng.chat_ids(messages)
        assert len(ids) > 100  # long enough that the llama3 rope scaling matters
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].float()
            got = eng.model(torch.tensor([ids]), 0)[0]
        assert (got - want).abs().max().item() < 1e-4
        assert (got.argmax(-1) == want.argmax(-1)).all()
        assert eng.tokenizer.stop_ids >= {eng.tokenizer.token_to_id("<|im_end|>")}
    finally:
        eng.close()
