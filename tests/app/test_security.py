"""Crafted requests against a real dashboard server on 127.0.0.1 (app/security.py, docs/security.md).

The server is Werkzeug's, serving the app from a thread of this process, so a test can also count what the
server did (folder walks); the request-log test runs ``rldiag dashboard`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dash
import pytest
from synth import SPIKE_STEP

from rldiag.cli import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


class Server:
    """A dashboard app served by Werkzeug on 127.0.0.1 from a background thread."""

    def __init__(self, app: dash.Dash) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.httpd = make_server("127.0.0.1", 0, app.server, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.deps = {d["output"]: d for d in json.loads(self.get("/_dash-dependencies")[1])}

    def get(self, path: str) -> tuple[int, bytes]:
        return _send(urllib.request.Request(self.url + path))

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        return _send(req)

    def callback(self, output: str, values: dict[str, Any]) -> tuple[int, bytes]:
        """Call the callback whose output string contains ``output`` with ``values`` (id.property -> value)."""
        dep = next(d for k, d in self.deps.items() if output in k)
        inputs = [{**i, "value": values.get(f"{i['id']}.{i['property']}")} for i in dep["inputs"]]
        state = [{**s, "value": values.get(f"{s['id']}.{s['property']}")} for s in dep["state"]]
        outputs = [
            {"id": part.split(".")[0], "property": part.split(".")[1]} for part in dep["output"].strip(".").split("...")
        ]
        body = {
            "output": dep["output"],
            "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": inputs,
            "state": state,
            "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"],
        }
        return self.post("/_dash-update-component", json.dumps(body).encode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.thread.join(timeout=10)


def _send(req: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def server(make_app, tokenizer_dir) -> Iterator[Server]:
    s = Server(make_app(tokenizer=tokenizer_dir))
    yield s
    s.close()


def test_request_body_and_url_are_bounded(server: Server):
    from app.security import MAX_BODY_BYTES, MAX_URL_BYTES

    status, body = server.post("/_dash-update-component", b"[" * (MAX_BODY_BYTES + 1))
    assert status == 413, body[:200]
    # a body that lies about its size (chunked, no Content-Length) is cut off at the bound too
    status, _ = server.post(
        "/_dash-update-component", iter([b" " * (MAX_BODY_BYTES + 1)]), {"Transfer-Encoding": "chunked"}
    )  # type: ignore[arg-type]
    assert status in (400, 413)
    status, body = server.get("/?run=" + "a" * MAX_URL_BYTES)
    assert status == 414 and b"too long" in body
    assert server.get("/?run=grpo_full")[0] == 200  # an ordinary request still passes


def test_tokens_rows_are_bounded_server_side(server: Server):
    from app.pages.tokens import MAX_K

    values = {"page-runs.data": ["grpo_full"], "tokens-step.value": SPIKE_STEP, "tokens-color.value": "logratio"}
    status, small = server.callback("tokens-body", {**values, "tokens-k.value": MAX_K})
    assert status == 200
    status, huge = server.callback("tokens-body", {**values, "tokens-k.value": 10**9})
    assert status == 200 and len(huge) == len(small)  # k=10**9 gives what k=MAX_K gives
    for k in ("inf", [1], -5, 2**70):
        status, _ = server.callback("tokens-body", {**values, "tokens-k.value": k})
        assert status == 200, k
    status, _ = server.callback("tokens-body", {**values, "tokens-step.value": "1e400", "tokens-k.value": 10})
    assert status == 200


def test_unknown_run_ids_do_not_walk_the_folder_again(server: Server):
    cat = server.app.server.extensions["rldiag"]
    cat.run_ids()
    walks = cat.walks
    wanted = [f"nope/{i}" for i in range(400)] + ["grpo_full"]
    status, body = server.callback("alerts-states", {"page-runs.data": wanted, "live-interval.n_intervals": 0})
    assert status == 200
    assert cat.walks - walks <= 1, f"{cat.walks - walks} walks for 400 unknown ids"
    # and no request resolves more than MAX_ID_CHECKS ids, nor shows more than MAX_RUN_IDS runs
    from app.security import MAX_ID_CHECKS, MAX_RUN_IDS

    assert len(cat.valid_ids(["grpo_full"] * 3 + ["sweep/minimal"] * 200)) == 2
    assert cat.valid_ids([f"x{i}" for i in range(MAX_ID_CHECKS)] + ["grpo_full"]) == []
    assert MAX_RUN_IDS <= MAX_ID_CHECKS


def test_bad_alert_lines_are_shown_or_skipped_never_a_500(make_app, tmp_path: Path):
    import shutil

    from synth import record_run

    root = tmp_path / "runs"
    record_run(root / "r", steps=3)
    base = {"event": "firing", "rule": "kl_spike", "fingerprint": "f", "step": 2, "severity": "warn"}
    lines = [
        {**base, "time": 1e20, "summary": "time far in the future"},
        {**base, "time": -1e300, "value": "high", "threshold": [1], "step": 2**70},
        {**base, "rule": ["not", "a", "name"], "time": "yesterday", "start_step": -3},
        {**base, "summary": "evil \u202eeulav\u202c and \x1b[31mred\x1b[0m", "time": 1.7e9},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{torn"
    (root / "r" / "alerts.jsonl").write_text(text)
    s = Server(make_app(root))
    try:
        status, body = s.callback("alerts-states", {"page-runs.data": ["r"], "live-interval.n_intervals": 0})
        assert status == 200, body[:500]
        page = body.decode()
        assert "time far in the future" in page  # the line is kept; its impossible time is left blank
        decoded = json.dumps(json.loads(body), ensure_ascii=False)
        assert "\u202e" not in decoded and "\x1b" not in decoded
        assert "\\\\u202e" in decoded and "\\\\x1b" in decoded  # shown, escaped
    finally:
        s.close()
        shutil.rmtree(root)


def test_token_text_shows_control_and_bidi_characters_escaped(make_app):
    app = make_app()
    with app.server.test_request_context():
        from app.pages.tokens import _shown

        assert _shown("abc\u202edef") == "abc\\u202edef"
        assert _shown("\u2066x\u2069") == "\\u2066x\\u2069"
        assert _shown("\x00\x1b[2J") == "\\x00\\x1b[2J"
        assert _shown("a\nb\t") == "a↵b⇥"
        assert _shown("\u200b") == "\\u200b"  # zero-width space: a format character
        assert _shown("<script>é 中</script>") == "<script>é 中</script>"  # ordinary text untouched


# --- the command line: --debug and the request log -----------------------------------------------------
@pytest.fixture
def no_serve(monkeypatch):
    calls = []
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: calls.append(kw))
    return calls


@pytest.mark.parametrize(
    "extra, refused",
    [
        (["--debug"], "no --auth"),
        (["--debug", "--auth", "a:b", "--host", "0.0.0.0"], "not loopback"),
        (["--debug", "--host", "0.0.0.0"], "(use --host 127.0.0.1) and has no --auth"),
        (["--debug", "--auth", "a:b"], None),
    ],
)
def test_debug_needs_loopback_and_auth(extra, refused, runs_root: Path, capsys, no_serve):
    code = main(["dashboard", str(runs_root), *extra])
    err = capsys.readouterr().err
    if refused:
        assert code == 2 and refused in err and "--debug" in err and no_serve == []
    else:
        assert code == 0 and no_serve[-1]["debug"] is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("verbose", [False, True])
def test_request_log_is_off_unless_verbose(verbose: bool, runs_root: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "rldiag", "dashboard", str(runs_root), "--port", str(port)]
    proc = subprocess.Popen(
        cmd + (["--verbose"] if verbose else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline, served = time.time() + 60, 0
        while time.time() < deadline and served < 3:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=5):
                    served += 1
            except OSError:
                time.sleep(0.3)
        assert served == 3
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    request_lines = [line for line in (out + err).splitlines() if '"GET /_dash-layout' in line]
    assert "open http://127.0.0.1" in err
    assert len(request_lines) == (3 if verbose else 0), err[-2000:]


def test_every_app_is_quiet_by_default_the_demo_included(make_app):
    """``rldiag demo --serve`` builds its server with create_app too: the filter is on without any flag."""
    import logging

    from app.security import request_log

    make_app()
    logger = logging.getLogger("werkzeug")
    line = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, '%s - - [%s] "%s" 200 -', None, None)
    line.args = ("127.0.0.1", "28/Nov/2026 08:00:00", "GET / HTTP/1.1")
    error = logging.LogRecord("werkzeug", logging.ERROR, __file__, 1, "Error on request", None, None)
    assert not logger.filter(line) and logger.filter(error)
    request_log(True)
    try:
        assert logger.filter(line)
    finally:
        request_log(False)
