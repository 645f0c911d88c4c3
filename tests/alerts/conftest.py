"""Fixtures of the alert tests: a synthetic healthy run, a real HTTP receiver on 127.0.0.1, a fake clock."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import polars as pl
import pytest

HEALTHY_LEVELS: dict[str, tuple[float, float]] = {
    # metric: (level, noise sd) - levels of the healthy toy PPO run (tests/alerts/alerts_pg_toy.py)
    "entropy/mean": (2.6, 0.03),
    "entropy/low_frac": (0.0, 0.0),
    "entropy/cov": (0.1, 0.015),
    "ratio/nonfinite": (0.0, 0.0),
    "ratio/logabs_p999": (0.3, 0.05),
    "ratio/tail_alpha": (30.0, 8.0),
    "ratio/m2": (0.006, 0.002),
    "ess/token": (0.994, 0.002),
    "clip/region": (0.012, 0.003),
    "kl/k3": (0.003, 0.001),
    "mismatch/tis_frac": (0.0, 0.0),
    "mismatch/k3": (3e-6, 4e-7),
    "group/nonzero_frac": (0.97, 0.02),
    "balance/pos_share": (0.506, 0.003),
}


def healthy_frame(n: int = 200, seed: int = 0, start: int = 0) -> pl.DataFrame:
    """Step metrics of a healthy run: every metric noisy around a healthy level (values clipped to bounds)."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"step": np.arange(start, start + n, dtype=np.int64)}
    for name, (level, sd) in HEALTHY_LEVELS.items():
        x = level + sd * rng.standard_normal(n)
        if name in ("ess/token", "group/nonzero_frac", "entropy/low_frac", "balance/pos_share"):
            x = np.clip(x, 0.0, 1.0)
        if name in ("ratio/m2", "clip/region", "kl/k3", "mismatch/k3", "ratio/logabs_p999"):
            x = np.abs(x)
        data[name] = x
    return pl.DataFrame(data)


def with_values(frame: pl.DataFrame, metric: str, values: dict[int, float]) -> pl.DataFrame:
    """``frame`` with ``metric`` set to ``values[step]`` at the given steps."""
    col = frame[metric].to_numpy().copy()
    steps = frame["step"].to_list()
    for step, v in values.items():
        col[steps.index(step)] = v
    return frame.with_columns(pl.Series(metric, col))


class Clock:
    """A settable wall clock for deterministic tests."""

    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Receiver:
    """A webhook receiver: ``mode`` "ok" (204), "500" (error) or "hang" (blocks until released)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[dict[str, Any]] = []
        self.requests = 0
        self.cond = threading.Condition()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.cond:
                    receiver.requests += 1
                    receiver.cond.notify_all()
                mode = receiver.mode
                if mode == "hang":
                    receiver.release.wait(30)
                if mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    return
                with receiver.cond:
                    receiver.received.append(
                        {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                    )
                    receiver.cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def wait_received(self, n: int, timeout: float = 20.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.received) >= n, timeout)

    def wait_requests(self, n: int, timeout: float = 20.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.requests >= n, timeout)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# --------------------------------------------------------------------------------------------------
# real third-party servers, started on 127.0.0.1 by the test suite

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
PROMETHEUS = "/usr/bin/prometheus"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """A JSON request to a server on 127.0.0.1 (no proxy)."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def wait_http(url: str, proc: Any, timeout: float = 30.0) -> None:
    import time
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with opener.open(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


class Alertmanager:
    """Debian's prometheus-alertmanager on 127.0.0.1 (no gossip), with a receiver that sends nothing."""

    def __init__(self, tmp: Any):
        import subprocess

        self.port = free_port()
        cfg = tmp / "alertmanager.yml"
        cfg.write_text("route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n")
        self.log = open(tmp / "alertmanager.log", "wb")
        self.proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={cfg}",
                f"--storage.path={tmp / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--cluster.listen-address=",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_http(f"{self.url}/-/ready", self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alerts(self, **query: str) -> list[dict[str, Any]]:
        from urllib.parse import urlencode

        return http_json("GET", f"{self.url}/api/v2/alerts" + ("?" + urlencode(query) if query else ""))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alertmanager]:
    import os

    if not os.access(ALERTMANAGER, os.X_OK):
        pytest.skip(f"{ALERTMANAGER} is not installed (Debian package prometheus-alertmanager)")
    am = Alertmanager(tmp_path_factory.mktemp("alertmanager"))
    yield am
    am.close()
