"""Shared fixtures: real embedded models, loaded once per test session; the MQTT suites' broker fixtures."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

# The MQTT suites' fixtures (a real Mosquitto, a recorder, bridges closed after the test).
from mqtt_broker import agent_id, broker, make_bridge, own_broker, recorder  # noqa: F401

# The repository's folders are installed as `rejoinder.*` (pyproject.toml). With the checkout itself
# on sys.path (`python -m pytest` puts the working directory first), its top-level `kernels/` would
# shadow Hugging Face's `kernels` package, which transformers (the engine's reference in the tests)
# imports whenever it is installed: "cannot import name 'CUDAProperties' from 'kernels'".
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

# Quiet, deterministic CPU runs: the CI box has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; its CPU/interpreter twin runs instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models():
    """The agent's embedded models (Models), loaded once for every suite that runs real sessions."""
    from webrtc_server import shared_agent

    return shared_agent()[0]


@pytest.fixture(scope="session")
def llm_path():
    from rejoinder.streaming.assets import resolve

    return resolve("llm")


@pytest.fixture(scope="session")
def engine(llm_path):
    from rejoinder.engine import Engine, EngineOptions

    eng = Engine.load(llm_path, EngineOptions(max_seq_len=2048))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_gguf_reference(llm_path):
    """The same GGUF file loaded by HF transformers: an independent implementation to compare to."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(llm_path.parent), gguf_file=llm_path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(llm_path.parent), gguf_file=llm_path.name)
    return model, tok
