"""Recorder(log_to=..., metrics_port=...): trackers and a Prometheus endpoint fed off the training thread."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import rldiag
from tests.alerts.conftest import free_port


def test_recorder_log_to_tensorboard_and_metrics_port(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, tb, port = tmp_path / "live", tmp_path / "tb", free_port()
    rng = np.random.default_rng(0)
    with rldiag.Recorder(run, log_to=f"tensorboard:{tb}", metrics_port=port) as rec:
        for s in range(6):
            old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
            lp = np.minimum(old + rng.normal(0, 0.05, old.shape), 0).astype(np.float32)
            for _ in range(2):  # two micro-batches per step: exported once, merged
                rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=np.ones(4, np.float32))
        rec.flush()

        def scrape() -> dict:
            text = (
                urllib.request.build_opener(urllib.request.ProxyHandler({}))
                .open(f"http://127.0.0.1:{port}/metrics")
                .read()
                .decode()
            )
            return {
                (s.name, s.labels.get("metric")): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.labels.get("run") == "live"
            }

        # the exporter has its own thread: flush() returns once the writer is done, the export follows
        deadline = time.monotonic() + 60
        samples = scrape()
        while samples.get(("rldiag_step", None), -1) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
            samples = scrape()
    assert samples[("rldiag_step", None)] >= 4  # the writer's latest finished step (the last one waits for close)
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    metrics = rldiag.open_run(run).step_metrics().sort("step")
    kl = acc.Scalars("kl/k3")
    assert [e.step for e in kl] == list(range(6))
    assert np.allclose([e.value for e in kl], metrics["kl/k3"].to_numpy(), rtol=1e-6)
    assert [h.histogram_value.num for h in acc.Histograms("hist/log_ratio")] == [64] * 6


def _attempt(run: Path, steps: range, log_to: str, seed: int) -> list[tuple[str, int, int]]:
    """One attempt of a job (a process) exporting live; returns what its exporter could not replace."""
    rng = np.random.default_rng(seed)
    with rldiag.Recorder(run, log_to=log_to) as rec:
        for s in steps:
            old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
            lp = np.minimum(old + rng.normal(0, 0.05 * (1 + seed), old.shape), 0).astype(np.float32)
            rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=np.ones(4, np.float32))
        live = rec.exports
    assert live is not None
    return live.kept_earlier


def test_a_job_resumed_from_a_checkpoint_replaces_the_steps_tensorboard_got_from_the_attempt_before(
    tmp_path: Path,
) -> None:
    """Preempted after step 7, resumed from its checkpoint at step 5: TensorBoard shows the resumed attempt's
    steps 5-7, as rldiag counts them, not the replaced attempt's (TensorBoard's own purge rule)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, tb = tmp_path / "run", tmp_path / "tb"
    assert _attempt(run, range(8), f"tensorboard:{tb}", seed=0) == []
    assert _attempt(run, range(5, 10), f"tensorboard:{tb}", seed=1) == []  # nothing kept from before
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    kl = acc.Scalars("kl/k3")
    metrics = rldiag.open_run(run).step_metrics().sort("step")
    assert [e.step for e in kl] == list(range(10)) == metrics["step"].to_list()
    assert np.allclose([e.value for e in kl], metrics["kl/k3"].to_numpy(), rtol=1e-6)
    from rldiag.export.trackers import TensorBoardExporter

    assert TensorBoardExporter(tb).last_step() == 9  # a later export reads the same steps back


def test_a_tracker_that_cannot_drop_steps_says_which_keep_the_earlier_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _attempt(run, range(8), f"mlflow:{uri}", seed=0) == []
    with caplog.at_level("WARNING", logger="rldiag.export"):
        assert _attempt(run, range(5, 10), f"mlflow:{uri}", seed=1) == [("mlflow", 5, 7)]
    assert "already holds steps 5..7" in caplog.text and "cannot drop a step" in caplog.text
    client = MlflowClient(uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("rldiag").experiment_id])
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "kl/k3")] == list(range(10))


def test_a_new_run_never_drops_what_a_shared_tracker_holds(tmp_path: Path) -> None:
    """Only a restarted job's later attempt replaces steps in a tracker: a new run pointed at a TensorBoard folder
    another run filled drops nothing there."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    _attempt(tmp_path / "a", range(8), f"tensorboard:{tb}", seed=0)
    _attempt(tmp_path / "b", range(4), f"tensorboard:{tb}", seed=1)
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    kept = rldiag.open_run(tmp_path / "a").step_metrics().sort("step")
    assert np.allclose([e.value for e in acc.Scalars("kl/k3")], kept["kl/k3"].to_numpy(), rtol=1e-6)


def test_two_ranks_export_the_merged_statistics_of_every_rank_live(tmp_path: Path) -> None:
    """Rank 0's live export on a two-rank run writes every rank's statistics merged, as the dashboard and the
    alerts see them, not rank 0's alone; live (from the writers' live tails) while both ranks still record,
    and the last step once both closed. Rank 1's log-ratios are ten times wider than rank 0's."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("prometheus_client")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rldiag.export import live

    run, tb, port = tmp_path / "run", tmp_path / "tb", free_port()
    rng = np.random.default_rng(0)
    saved, live.FOLLOW_INTERVAL = live.FOLLOW_INTERVAL, 0.2
    try:
        recs = [
            rldiag.Recorder(
                run,
                rank=r,
                world_size=2,
                live_seconds=0.05,
                roll_seconds=3600,  # no segment while the test runs: the live export reads the live tails
                log_to=f"tensorboard:{tb}" if r == 0 else None,
                metrics_port=port if r == 0 else None,
            )
            for r in (0, 1)
        ]
        assert recs[0].exports is not None and recs[1].exports is None
        for s in range(6):
            for r, rec in enumerate(recs):
                old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
                lp = np.minimum(old + rng.normal(0, 0.01 * (1 + 9 * r), old.shape), 0).astype(np.float32)
                rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=np.ones(4, np.float32))
        deadline = time.monotonic() + 60
        while recs[0].exports.exporters[0].last_step() != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recs[0].exports.exporters[0].last_step() == 4  # live: steps 0-4 complete on both ranks
        assert not list((run / "stats").glob("*.parquet"))  # from the live tails alone
        text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://127.0.0.1:{port}/metrics")
        assert 'rldiag_step{run="run"} 4.0' in text.read().decode()  # the newest merged step
        for rec in (recs[1], recs[0]):
            rec.close()
    finally:
        live.FOLLOW_INTERVAL = saved
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    merged = rldiag.open_run(run).step_metrics().sort("step")
    rank0 = rldiag.open_run(run).step_metrics(ranks=[0]).sort("step")
    kl = acc.Scalars("kl/k3")
    assert [e.step for e in kl] == list(range(6))  # the last step at close, once every rank closed
    assert np.allclose([e.value for e in kl], merged["kl/k3"].to_numpy(), rtol=1e-6)
    assert not np.allclose([e.value for e in kl], rank0["kl/k3"].to_numpy(), rtol=0.5)  # not rank 0's alone
    assert [h.histogram_value.num for h in acc.Histograms("hist/log_ratio")] == [64] * 6  # both ranks' tokens


def test_two_ranks_metrics_port_alone_serves_the_newest_merged_step(tmp_path: Path) -> None:
    """A multi-rank recorder with a Prometheus endpoint and no tracker still follows the run."""
    pytest.importorskip("prometheus_client")
    from rldiag.export import live

    run, port = tmp_path / "run", free_port()
    rng = np.random.default_rng(0)
    saved, live.FOLLOW_INTERVAL = live.FOLLOW_INTERVAL, 0.2
    recs = [
        rldiag.Recorder(run, rank=r, world_size=2, live_seconds=0.05, metrics_port=port if r == 0 else None)
        for r in (0, 1)
    ]
    try:
        for s in range(4):
            for rec in recs:
                old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
                rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline, text = time.monotonic() + 60, ""
        while 'rldiag_step{run="run"} 2.0' not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = opener.open(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'rldiag_step{run="run"} 2.0' in text  # steps 0-2 complete on both ranks
    finally:
        live.FOLLOW_INTERVAL = saved
        for rec in recs:
            rec.close()
