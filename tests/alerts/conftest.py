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
                    receiver.received.append({"path": self.path, "headers": dict(self.headers),
                                              "json": json.loads(body)})
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
