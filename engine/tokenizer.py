"""Text <-> token ids and the model's chat template.

Built either from GGUF metadata (vocabulary, merges, token types, pre-tokenizer name) or from an HF
`tokenizer.json`, both into a `tokenizers.Tokenizer`, so encoding is the same fast Rust code either way.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rejoinder.errors import BadInputError

from .errors import ModelFileError

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4
_END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>",
                      "<end_of_turn>")
# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}

Message = dict[str, Any]


@dataclass
class ChatTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str = ""
    eos_token: str = ""
    stop_ids: set[int] = field(default_factory=set)
    _template: Any = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any) -> str:
        if not self.chat_template:
            # ChatML is what most small instruct models expect when they carry no template.
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg: str) -> None:  # the template refuses these messages
                raise BadInputError(f"chat template: {msg}")

            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra))


def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pre: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if pre in _DIGIT_SPLIT_PRE:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe", "qwen2", "deepseek-r1-qwen"):
        split = _QWEN2_SPLIT if pre.startswith(("qwen2", "deepseek-r1-qwen")) else _LLAMA3_SPLIT
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # "gpt2", "default" and unknown names: GPT-2's own byte-level split
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def tokenizer_from_gguf(meta: dict[str, Any]) -> ChatTokenizer:
    from tokenizers import AddedToken

    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFileError("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if model != "gpt2":
        raise ModelFileError(
            f"GGUF tokenizer model {model!r} is not supported yet (byte-level BPE 'gpt2' is); "
            "load the model as a safetensors folder with tokenizer.json instead"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = _byte_level_tokenizer(vocab, merges, meta.get("tokenizer.ggml.pre") or "default")
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tk.add_special_tokens(special)

    def tok(key: str) -> str:
        idx = meta.get(key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else ""

    eos = tok("tokenizer.ggml.eos_token_id")
    stop = {vocab[n] for n in _END_OF_TURN_NAMES if n in vocab}
    if eos:
        stop.add(vocab[eos])
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if isinstance(eot, int):
        stop.add(eot)
    return ChatTokenizer(tk, meta.get("tokenizer.chat_template"), tok("tokenizer.ggml.bos_token_id"), eos, stop)


def tokenizer_from_folder(folder: Path, generation_eos: Sequence[int] = ()) -> ChatTokenizer:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFileError(f"{folder} has no tokenizer.json")
    try:
        tk = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path} is not a valid tokenizer.json: {exc}") from None
    cfg_path = folder / "tokenizer_config.json"
    try:
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except ValueError as exc:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {exc}") from None

    def tok_str(v: Any) -> str:
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    template = cfg.get("chat_template")
    if isinstance(template, list):  # some repos ship several named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    eos = tok_str(cfg.get("eos_token"))
    vocab = tk.get_vocab(with_added_tokens=True)
    stop = {vocab[n] for n in _END_OF_TURN_NAMES if n in vocab} | set(generation_eos)
    if eos in vocab:
        stop.add(vocab[eos])
    return ChatTokenizer(tk, template, tok_str(cfg.get("bos_token")), eos, stop)
