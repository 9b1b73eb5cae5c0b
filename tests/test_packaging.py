"""The wheel a user installs: built from this checkout, installed non-editable into a fresh venv, run.

The fresh venv gets its third-party dependencies from the test's own environment (a `.pth` path,
so nothing is downloaded), but Rejoinder itself only from the wheel: it runs from outside the
checkout, so nothing can be imported from the source tree by accident.
"""
from __future__ import annotations

import os
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("rejoinder-*.whl")
    return whl


def test_wheel_holds_the_web_client_the_kernel_source_and_py_typed(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for web_file in ("index.html", "app.js", "rtc.js", "style.css"):
        assert f"rejoinder/web/{web_file}" in names, sorted(n for n in names if "web" in n)
    assert "rejoinder/kernels/cpu_decode.c" in names
    assert "rejoinder/py.typed" in names
    assert "rejoinder/errors.py" in names and "rejoinder/agent/cli/__init__.py" in names
    assert "livekit/plugins/rejoinder/llm.py" in names
    # Nothing called `agent`, `streaming` or `kernels` at the top of site-packages.
    assert not {n.split("/")[0] for n in names} & {"agent", "streaming", "engine", "kernels", "web"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_installed_wheel_serves_the_page(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # Third-party packages from this environment (lines of a .pth add paths; the editable install's
    # own .pth in there is not processed, so the checkout stays invisible).
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages(),
            *(p for p in sys.path if p.endswith("site-packages"))}
    (purelib / "zz_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import rejoinder.agent, rejoinder.streaming.signalling as s; "
                            "print(rejoinder.agent.__file__); print(s.default_web_dir())"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    agent_file, web_dir = where.stdout.split()
    assert agent_file.startswith(str(venv)) and web_dir.startswith(str(venv)), where.stdout

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REJOINDER_")}
    server = subprocess.Popen([str(venv / "bin" / "rejoinder"), "serve", "--port", str(port), "--ice-host",
                               "127.0.0.1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        page = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    page = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page is not None, (server.stdout.read().decode()[-3000:] if server.poll() is not None else "no answer")
        assert "<html" in page.lower() and "app.js" in page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/app.js", timeout=5) as r:
            assert r.status == 200 and len(r.read()) > 1000
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            assert b'"ok": true' in r.read()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0, server.stdout.read().decode()[-3000:]
