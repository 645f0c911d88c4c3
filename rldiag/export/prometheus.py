"""Serve the latest step's metrics and the alert states in Prometheus' text format.

``rldiag watch RUN... --metrics-port P`` and ``Recorder(..., metrics_port=P)`` start a
:class:`MetricsServer`: an HTTP endpoint (``/metrics``, ``prometheus_client``) that any Prometheus scrapes.
Every series is labelled by ``run``:

- ``rldiag_metric{run, metric}``: the last evaluated step's value of each headline metric
  (``metric`` keeps rldiag's name, ``kl/k3``; one family, so a Grafana panel selects by label);
- ``rldiag_step{run}``: that step;
- ``rldiag_alert_firing{run, alertname, severity}``: 1 while the rule fires, else 0;
- ``rldiag_alert_state{run, alertname, severity, state}``: 1 for the rule's current state
  (``inactive``, ``pending``, ``firing``, ``resolved``, ``nodata``).

The server binds 127.0.0.1 unless told otherwise; it reads a snapshot under a lock, so updating it from
the evaluator thread never waits for a scrape.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

__all__ = ["MetricsServer", "metrics_server_available"]

_STATES = ("inactive", "pending", "firing", "resolved", "nodata")


def metrics_server_available() -> bool:
    """True when ``prometheus_client`` is importable."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ImportError(
            "serving metrics to Prometheus needs prometheus_client: pip install 'rldiag[prometheus]'"
        ) from None
    return prometheus_client


class MetricsServer:
    """Holds the latest values per run and serves them on ``http://host:port/metrics``.

    >>> srv = MetricsServer(port=9109)                                      # doctest: +SKIP
    >>> srv.update("exp1", 12, {"kl/k3": 0.002, "entropy/mean": 1.4})      # doctest: +SKIP
    >>> srv.close()                                                         # doctest: +SKIP

    ``metrics``: which metric names to serve (default: the registry's headline metrics; None in
    :meth:`update` values are skipped). ``port=0`` picks a free port (read :attr:`port`).
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *, metrics: Iterable[str] | None = None):
        pc = _require()
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.registry import CollectorRegistry

        if metrics is None:
            from rldiag.metrics.registry import HEADLINE

            metrics = HEADLINE
        self.metrics = tuple(metrics)
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, dict[str, float]]] = {}
        self._alerts: dict[str, dict[str, tuple[str, str]]] = {}
        server = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                with server._lock:
                    values = {r: (s, dict(v)) for r, (s, v) in server._values.items()}
                    alerts = {r: dict(a) for r, a in server._alerts.items()}
                metric = GaugeMetricFamily(
                    "rldiag_metric", "rldiag metric at the run's last evaluated step", labels=["run", "metric"]
                )
                step = GaugeMetricFamily("rldiag_step", "the run's last evaluated step", labels=["run"])
                for run, (s, vals) in sorted(values.items()):
                    step.add_metric([run], float(s))
                    for name, v in vals.items():
                        metric.add_metric([run, name], v)
                firing = GaugeMetricFamily(
                    "rldiag_alert_firing", "1 while the alert rule fires", labels=["run", "alertname", "severity"]
                )
                state = GaugeMetricFamily(
                    "rldiag_alert_state",
                    "1 for the alert rule's current state",
                    labels=["run", "alertname", "severity", "state"],
                )
                for run, rules in sorted(alerts.items()):
                    for rule, (sev, st) in sorted(rules.items()):
                        firing.add_metric([run, rule, sev], 1.0 if st == "firing" else 0.0)
                        for name in _STATES:
                            state.add_metric([run, rule, sev, name], 1.0 if st == name else 0.0)
                yield from (metric, step, firing, state)

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector())
        self._server, self._thread = pc.start_http_server(int(port), addr=host, registry=self.registry)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def update(self, run: str, step: int, values: Mapping[str, Any]) -> None:
        """Set ``run``'s latest step and its metric values (non-numeric and missing ones are left out)."""
        kept: dict[str, float] = {}
        for name in self.metrics:
            v = values.get(name)
            try:
                f = float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if not math.isnan(f):
                kept[name] = f
        with self._lock:
            self._values[run] = (int(step), kept)

    def update_frame(self, run: str, frame: pl.DataFrame | None) -> None:
        """:meth:`update` from the last row of a step-metrics frame (a polars DataFrame with ``step``)."""
        if frame is None or frame.height == 0:
            return
        row = frame.sort("step").row(-1, named=True)
        self.update(run, int(row["step"]), row)

    def set_alerts(self, run: str, status: Mapping[str, Any]) -> None:
        """Set ``run``'s alert states from ``Engine.status()`` (rule -> RuleStatus)."""
        rules = {name: (str(s.severity), str(getattr(s.state, "value", s.state))) for name, s in status.items()}
        with self._lock:
            self._alerts[run] = rules

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
