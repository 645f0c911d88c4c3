"""``rldiag dashboard``: argument checks, the exposure warning, and a real server on loopback."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dash
import pytest

from rldiag.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_serve(monkeypatch):
    """Replace Dash.run: the command runs to the point of serving, then returns (its check that the port is free
    is skipped too: nothing listens, and the default port may be another test's)."""
    import rldiag.commands.dashboard as command

    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: calls.append(kw))
    monkeypatch.setattr(command, "check_port", lambda host, port: None)
    return calls


def test_a_port_in_use_is_one_line_before_anything_loads(capsys, runs_root: Path, monkeypatch):
    served = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: served.append(kw))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["dashboard", str(runs_root), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in err and "another --port" in err
    assert "serving" not in err and served == []
    assert main(["dashboard", str(runs_root), "--port", str(port)]) == 0  # free again
    # an address of no interface here (TEST-NET-1, reserved for documentation): said as such
    assert main(["dashboard", str(runs_root), "--host", "192.0.2.1", "--port", str(port)]) == 2
    assert "not an address of this machine" in capsys.readouterr().err
    assert len(served) == 1  # only the call on the free port served


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dashboard", "/no/such/dir"], "does not exist"),
        (["dashboard", "--auth", "alice"], "USER:PASSWORD"),
        (["dashboard", "--tokenizer", "/no/such/tok"], "is not a folder"),
        (["dashboard", "--port", "0"], "--port"),
    ],
)
def test_bad_arguments_say_what_to_do(argv, message, capsys, runs_root: Path, no_serve):
    if argv[1].startswith("--"):
        argv = [argv[0], str(runs_root), *argv[1:]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert no_serve == []


def test_loopback_by_default_and_a_warning_when_exposed(capsys, runs_root: Path, no_serve):
    assert main(["dashboard", str(runs_root)]) == 0
    assert no_serve[-1]["host"] == "127.0.0.1" and no_serve[-1]["port"] == 8050
    err = capsys.readouterr().err
    assert "warning" not in err and "serving 2 run(s)" in err
    assert main(["dashboard", str(runs_root), "--host", "0.0.0.0", "--port", "9999"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "--auth" in err
    assert no_serve[-1]["host"] == "0.0.0.0"


def test_auth_can_come_from_the_environment(monkeypatch, capsys, runs_root: Path, no_serve):
    monkeypatch.setenv("RLDIAG_DASHBOARD_AUTH", "alice:s3cret")
    assert main(["dashboard", str(runs_root), "--host", "0.0.0.0"]) == 0
    assert "TLS" in capsys.readouterr().err  # auth is on: the warning is about plain HTTP only


@pytest.mark.slow
def test_a_real_server_on_loopback_requires_the_password(runs_root: Path, tmp_path: Path):
    port = _free_port()
    env = {**os.environ, "RLDIAG_DASHBOARD_AUTH": "alice:s3cret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rldiag", "dashboard", str(runs_root), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 60
        status = None
        while time.time() < deadline and status is None:
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.3)
        assert status == 401
        req = urllib.request.Request(
            url, headers={"Authorization": "Basic " + base64.b64encode(b"alice:s3cret").decode()}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200 and b"rldiag" in resp.read()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
