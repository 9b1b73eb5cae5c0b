"""GGUF tensor types (F32/F16/Q8_0/Q4_0/Q4_1) on small random models written by the test.

The file is written the way llama.cpp's converter writes it (Q/K rows permuted for its RoPE), then
loaded both by us and by HF transformers' own GGUF reader; the logits must agree.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rejoinder.engine import Engine, EngineOptions

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

DIM, FFN, LAYERS, HEADS, KV = 64, 96, 2, 4, 2


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to Q and K rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokens():
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return tokens, types


def write_random_gguf(path, qtype: Q, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tokens, types = _tokens()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)

    def add(name: str, arr: np.ndarray, quantised: bool = True) -> None:
        arr = arr.astype(np.float32)
        if not quantised or qtype == Q.F32:
            w.add_tensor(name, arr)
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 0.08, (rows, cols))

    add("token_embd.weight", mat(vocab, DIM))
    add("output_norm.weight", 1 + rng.normal(0, 0.1, DIM), quantised=False)
    add("output.weight", mat(vocab, DIM))
    hd = DIM // HEADS
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", 1 + rng.normal(0, 0.1, DIM), quantised=False)
        add(f"blk.{i}.ffn_norm.weight", 1 + rng.normal(0, 0.1, DIM), quantised=False)
        add(f"blk.{i}.attn_q.weight", _permute(mat(HEADS * hd, DIM), HEADS))
        add(f"blk.{i}.attn_k.weight", _permute(mat(KV * hd, DIM), KV))
        add(f"blk.{i}.attn_v.weight", mat(KV * hd, DIM))
        add(f"blk.{i}.attn_output.weight", mat(DIM, HEADS * hd))
        add(f"blk.{i}.ffn_gate.weight", mat(FFN, DIM))
        add(f"blk.{i}.ffn_up.weight", mat(FFN, DIM))
        add(f"blk.{i}.ffn_down.weight", mat(DIM, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_gguf_tensor_types_match_transformers(tmp_path, qtype):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_random_gguf(path, qtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    eng = Engine.load(path, EngineOptions(max_seq_len=128))
    try:
        ids = torch.randint(0, eng.model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ref(ids).logits[0].float()
            got = eng.model(ids, 0)[0]
        assert (got - want).abs().max().item() < 1e-4
        assert (got.argmax(-1) == want.argmax(-1)).all()
        assert eng.tokenizer.decode(eng.tokenizer.encode("héllo wörld")) == "héllo wörld"
    finally:
        eng.close()


def test_unpermuted_file_would_differ(tmp_path):
    """Guards the test above: without our Q/K un-permutation the logits must visibly change."""
    from rejoinder.engine.gguf_loader import unpermute_qk

    w = torch.randn(HEADS * 16, DIM)
    permuted = torch.from_numpy(_permute(w.numpy(), HEADS))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_qk(permuted, HEADS), w)
