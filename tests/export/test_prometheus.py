"""`rldiag watch RUN... --metrics-port P` scraped by a real Prometheus server (Debian's) on 127.0.0.1."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

import rldiag
from tests.alerts.conftest import PROMETHEUS, free_port, http_json, wait_http
from tests.alerts.test_watch import write_run

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_server_text_format() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from rldiag.export.prometheus import MetricsServer

    srv = MetricsServer(0, metrics=["kl/k3", "entropy/mean"])
    try:
        srv.update("exp1", 7, {"kl/k3": 0.25, "entropy/mean": float("nan"), "other": 3.0})
        import urllib.request

        text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(srv.url).read().decode()
    finally:
        srv.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("rldiag_metric", (("metric", "kl/k3"), ("run", "exp1")))] == 0.25
    assert samples[("rldiag_step", (("run", "exp1"),))] == 7.0
    assert not any(k[0] == "rldiag_metric" and ("metric", "entropy/mean") in k[1] for k in samples)  # NaN left out


def _query(prom: str, q: str) -> list[dict]:  # type: ignore[type-arg]
    return http_json("GET", f"{prom}/api/v1/query?" + urlencode({"query": q}))["data"]["result"]


@pytest.mark.slow
def test_prometheus_scrapes_watch(tmp_path: Path) -> None:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip(f"{PROMETHEUS} is not installed (Debian package prometheus)")
    pytest.importorskip("prometheus_client")
    runs = [tmp_path / "exp1", tmp_path / "ok"]
    write_run(runs[0])
    write_run(runs[1], spike=None, collapse_from=None)
    mport, pport = free_port(), free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rldiag\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{mport}']\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    watch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rldiag",
            "watch",
            *map(str, runs),
            "--metrics-port",
            str(mport),
            "--interval",
            "0.5",
            "--no-history",
            "-q",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    plog = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
        ],
        stdout=plog,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{pport}"
    try:
        wait_http(f"{url}/-/ready", prom)
        deadline = time.monotonic() + 60
        result: list[dict] = []  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            result = _query(url, 'rldiag_metric{metric="kl/k3"}')
            if len(result) == 2:
                break
            time.sleep(0.5)
        assert len(result) == 2, (result, (tmp_path / "prometheus.log").read_text()[-2000:])
        for r in result:
            run = rldiag.open_run(tmp_path / r["metric"]["run"])
            last = run.step_metrics().sort("step").row(-1, named=True)
            assert math.isclose(float(r["value"][1]), last["kl/k3"], rel_tol=1e-12), r
            assert r["metric"]["job"] == "rldiag"
        steps = {r["metric"]["run"]: float(r["value"][1]) for r in _query(url, "rldiag_step")}
        assert steps == {"exp1": 29.0, "ok": 29.0}
        firing = {
            r["metric"]["run"]: float(r["value"][1])
            for r in _query(url, 'rldiag_alert_firing{alertname="entropy_collapse"}')
        }
        assert firing == {"exp1": 1.0, "ok": 0.0}
    finally:
        prom.terminate()
        prom.wait(20)
        plog.close()
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=30)
    assert "serving metrics on http://127.0.0.1:" in err
    assert "run exp1: 30 steps evaluated" in out and "run ok: 30 steps evaluated" in out
