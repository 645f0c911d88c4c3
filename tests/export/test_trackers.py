"""`rldiag export` read back by the trackers' own readers: TensorBoard's EventAccumulator, MLflow's client."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import rldiag
from rldiag.cli import main
from tests.alerts.test_watch import write_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "exp1"
    write_run(path, steps=12, spike=5, collapse_from=None)
    return path


def _accumulator(logdir: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_histograms_and_no_duplicates(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    assert main(["export", str(run_dir), "--to", "tensorboard", str(tb)]) == 0
    assert main(["export", str(run_dir), "--to", "tensorboard", str(tb)]) == 0  # nothing written twice
    acc = _accumulator(tb)
    metrics = rldiag.open_run(run_dir).step_metrics().sort("step")
    kl = acc.Scalars("kl/k3")
    assert [e.step for e in kl] == metrics["step"].to_list()
    assert np.allclose([e.value for e in kl], metrics["kl/k3"].to_numpy(), rtol=1e-6)  # float32 in events
    finite = [
        c for c in metrics.columns if c != "step" and metrics[c].is_not_nan().all() and metrics[c].is_not_null().all()
    ]
    assert set(finite) <= set(acc.Tags()["scalars"])
    for tag in ("hist/log_ratio", "hist/entropy"):
        hists = acc.Histograms(tag)
        assert [h.step for h in hists] == metrics["step"].to_list()
        assert all(h.histogram_value.num == 16 * 24 for h in hists)  # every token of the step, once
    # the spike step's log-ratios spread far wider than a quiet step's
    spread = {h.step: h.histogram_value.max - h.histogram_value.min for h in acc.Histograms("hist/log_ratio")}
    assert spread[5] > 10 * spread[4]


def test_a_stopped_export_leaves_whole_steps_and_the_next_one_completes_them(run_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM during an export (the CLI sets the event) ends it between two steps: the tracker never
    holds part of a step, which a later export, resuming after the last step held, would never complete."""
    pytest.importorskip("tensorboard")
    import threading

    from rldiag.export.trackers import export_steps, make_exporter

    run = rldiag.open_run(run_dir)
    tb = tmp_path / "tb"
    stop = threading.Event()
    exporter = make_exporter("tensorboard", str(tb), "exp1")
    write = exporter.write

    def write_then_stop(step, metrics, hists=None):  # type: ignore[no-untyped-def]
        write(step, metrics, hists)
        if step == 3:
            stop.set()  # as the signal handler does, while step 3 is written

    exporter.write = write_then_stop  # type: ignore[method-assign]
    assert export_steps(run, exporter, stop=stop) == 4
    exporter.close()
    acc = _accumulator(tb)
    tags = acc.Tags()["scalars"]
    assert {tuple(e.step for e in acc.Scalars(t)) for t in tags} == {(0, 1, 2, 3)}  # every metric of each step
    exporter = make_exporter("tensorboard", str(tb), "exp1")
    assert export_steps(run, exporter) == len(run.steps()) - 4
    exporter.close()
    acc = _accumulator(tb)
    assert {tuple(e.step for e in acc.Scalars(t)) for t in tags} == {tuple(run.steps())}


def test_two_exports_in_one_second_are_read_in_the_order_they_were_written(run_dir: Path, tmp_path: Path) -> None:
    """TensorBoard orders a directory's event files by name (the creation second, then host, pid and a counter as
    text): a second export in the same second and process, whose counter went from 9 to 10, sorted first, and its
    steps were read before the first export's (which TensorBoard takes for a restart). The second file must sort
    last."""
    pytest.importorskip("tensorboard")
    from tensorboard.summary.writer import event_file_writer

    from rldiag.export.trackers import export_steps, make_exporter

    counter = event_file_writer._global_uid
    nxt = counter.get() + 1
    while len(str(nxt + 1)) == len(str(nxt)):  # the next two files' counters gain a digit (9 -> 10, 99 -> 100)
        nxt = counter.get() + 1
    run = rldiag.open_run(run_dir)
    tb = tmp_path / "tb"
    steps = run.steps()
    for part in (steps[:4], steps[4:]):
        exporter = make_exporter("tensorboard", str(tb), "exp1")
        assert export_steps(run, exporter, steps=part) == len(part)
        exporter.close()
    names = sorted(p.name for p in tb.glob("events.out.tfevents.*"))
    assert [n.rsplit(".", 1)[1] for n in names] == [str(nxt), str(nxt + 1)]  # the digit boundary was crossed
    assert [e.step for e in _accumulator(tb).Scalars("kl/k3")] == steps  # in order, each once


def test_steps_only_in_live_tails_are_exported_with_their_histograms(tmp_path: Path) -> None:
    """Two ranks of two micro-batches, nothing published yet: a follower exports the steps every rank has moved
    past from the writers' live tails, each with its histograms summed over every rank and micro-batch."""
    pytest.importorskip("tensorboard")
    from rldiag.alerts.follow import complete_steps
    from rldiag.export.trackers import export_steps, make_exporter

    run_dir, tb = tmp_path / "run", tmp_path / "tb"
    recs = [
        rldiag.Recorder(run_dir, rank=r, world_size=2, live_seconds=0.05, roll_seconds=3600, roll_steps=10**6)
        for r in (0, 1)
    ]
    rng = np.random.default_rng(0)
    try:
        for s in range(4):
            for rec in recs:
                for _ in range(2):
                    old = np.log(rng.uniform(0.05, 0.95, (4, 6))).astype(np.float32)
                    rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
        deadline = time.monotonic() + 30
        run = rldiag.open_run(run_dir)
        while complete_steps(run, after=None, closed=False) != [0, 1, 2] and time.monotonic() < deadline:
            time.sleep(0.1)
            run.refresh()
        assert not list((run_dir / "stats").glob("*.parquet"))  # live tails only
        exporter = make_exporter("tensorboard", str(tb), "live")
        assert export_steps(run, exporter, steps=complete_steps(run, after=None, closed=False)) == 3
        exporter.close()
    finally:
        for rec in recs:
            rec.close()
    hists = _accumulator(tb).Histograms("hist/log_ratio")
    assert [(h.step, h.histogram_value.num) for h in hists] == [(s, 2 * 2 * 4 * 6) for s in (0, 1, 2)]


def test_chosen_metrics_only(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    assert (
        main(["export", str(run_dir), "--to", "tensorboard", str(tb), "--metric", "kl/k3", "--metric", "entropy/mean"])
        == 0
    )
    assert sorted(_accumulator(tb).Tags()["scalars"]) == ["entropy/mean", "kl/k3"]


def test_mlflow_sqlite_store_slash_names_and_no_duplicates(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["export", str(run_dir), "--to", "mlflow", uri]) == 0
    assert main(["export", str(run_dir), "--to", "mlflow", uri]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("rldiag")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.tags["rldiag.run"] == "exp1"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, "kl/k3"))
    metrics = rldiag.open_run(run_dir).step_metrics().sort("step")
    assert [s for s, _ in hist] == metrics["step"].to_list()  # once per step
    assert all(math.isclose(v, ref, rel_tol=1e-12) for (_, v), ref in zip(hist, metrics["kl/k3"].to_list()))


def test_missing_target_and_file_store_refused(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(run_dir), "--to", "tensorboard"]) == 2
    assert main(["export", str(run_dir), "--to", "mlflow", "file:///tmp/x"]) == 2
    err = capsys.readouterr().err
    assert "needs a log directory" in err and "file store" in err


@pytest.mark.slow
def test_follow_streams_a_live_run(tmp_path: Path) -> None:
    """`export --follow` in another process exports each step of a run being recorded, once, and stops
    when the recorder closes the run."""
    pytest.importorskip("tensorboard")
    run, tb = tmp_path / "live", tmp_path / "tb"
    rng = np.random.default_rng(0)
    rec = rldiag.Recorder(run)
    old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
    rec.record(step=0, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
    rec.flush()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rldiag",
            "export",
            str(run),
            "--to",
            "tensorboard",
            str(tb),
            "--follow",
            "--interval",
            "0.2",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for s in range(1, 6):
            time.sleep(0.5)
            rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
            rec.flush()
        rec.close()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert [e.step for e in _accumulator(tb).Scalars("ratio/mean")] == [0, 1, 2, 3, 4, 5]
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # one writer across the whole follow


@pytest.mark.slow
def test_follow_ends_on_sigterm_like_ctrl_c(tmp_path: Path) -> None:
    """`export --follow` stopped by SIGTERM (a scheduler, a pod's shutdown) while the run is still live closes
    its writer and prints what it wrote, exit status 0, as Ctrl-C does."""
    pytest.importorskip("tensorboard")
    run, tb = tmp_path / "live", tmp_path / "tb"
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
    with rldiag.Recorder(run) as rec:
        for s in range(3):
            rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
        rec.flush()
        argv = [sys.executable, "-m", "rldiag", "export", str(run), "--to", "tensorboard", str(tb), "--follow"]
        proc = subprocess.Popen(
            [*argv, "--interval", "0.2"], env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while not list(tb.glob("events.out.tfevents.*")) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # a few rescans of the live run
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "rldiag export: 2 step(s) of live written to tensorboard" in err  # step 2 is live: it may still grow
    assert [e.step for e in _accumulator(tb).Scalars("ratio/mean")] == [0, 1]


def test_follow_outlives_a_read_failure_and_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`export --follow` on a run it has read once keeps going when the run cannot be read for a while (the
    network to a store, a mount): it says so once, writes nothing from the failed reads, and exports the steps
    that landed meanwhile once it reads the run again."""
    pytest.importorskip("tensorboard")
    import threading

    from tests.alerts.test_watch import _Flaky

    run, tb = tmp_path / "live", tmp_path / "tb"
    flaky: list[_Flaky] = []
    real_open = rldiag.open_run

    def open_flaky(where: object, *a: object, **k: object) -> _Flaky:
        flaky.append(_Flaky(real_open(where, *a, **k)))  # type: ignore[arg-type]
        return flaky[-1]

    monkeypatch.setattr(rldiag, "open_run", open_flaky)
    old = np.log(np.linspace(0.1, 0.9, 32)).reshape(4, 8).astype(np.float32)
    rec = rldiag.Recorder(run, roll_steps=1)
    got: list[int] = []
    try:
        for s in range(3):
            rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
        rec.flush()
        argv = ["export", str(run), "--to", "tensorboard", str(tb), "--follow", "--interval", "0.05"]
        thread = threading.Thread(target=lambda: got.append(main(argv)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not list(tb.glob("events.out.tfevents.*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        flaky[0].fail = OSError(116, "Stale file handle")
        for s in range(3, 6):
            rec.record(step=s, logprobs=old, old_logprobs=old, advantages=np.ones(4, np.float32))
        rec.flush()
        time.sleep(0.5)  # several passes that cannot read the run
        assert thread.is_alive()
        flaky[0].fail = None
    finally:
        rec.close()
    thread.join(60)
    assert got == [0]
    err = capsys.readouterr().err
    assert err.count("cannot read live ([Errno 116] Stale file handle); trying again every 0.05 s") == 1, err
    assert "reading live again" in err and "6 step(s) of live written" in err
    assert [e.step for e in _accumulator(tb).Scalars("ratio/mean")] == list(range(6))


def _wandb_history(run_file: Path) -> list[tuple[int, dict[str, object]]]:
    """The history records of an offline W&B run file, read with W&B's own protobuf definitions.

    The file is a LevelDB-style log (W&B's datastore: a 7-byte ':W&B' header, 32 KiB blocks, records of
    checksum/length/type + payload, full or split in first/middle/last parts) of ``wandb_internal_pb2.Record``.
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind in (2, 3):
            parts += chunk
            continue
        raw, parts = parts + chunk, b""
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items: dict[str, object] = {}
            for it in rec.history.item:
                key = it.key or "/".join(it.nested_key)
                items[key] = json.loads(it.value_json)
            out.append((rec.history.step.num, items))
    return out


@pytest.mark.slow
def test_wandb_offline(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "wb"
    assert main(["export", str(run_dir), "--to", "wandb", str(out)]) == 0
    assert main(["export", str(run_dir), "--to", "wandb", str(out)]) == 0  # resumes; writes nothing new
    hist = [h for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")) for h in _wandb_history(f)]
    metrics = rldiag.open_run(run_dir).step_metrics().sort("step")
    assert [s for s, _ in hist] == metrics["step"].to_list()  # each step once
    for (_, items), ref in zip(hist, metrics.iter_rows(named=True)):
        assert items["kl/k3"] == pytest.approx(ref["kl/k3"], rel=1e-12)
        assert sum(items["hist/log_ratio/values"]) == 16 * 24  # type: ignore[arg-type]
        assert len(items["hist/entropy/bins"]) == len(items["hist/entropy/values"]) + 1  # type: ignore[arg-type]


def test_wandb_without_a_login_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Online W&B without an API key: one line that says how to log in or write offline, exit status 2, and
    the folder the export would have written is not left behind."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONPATH=str(ROOT), HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"), NETRC=str(tmp_path / "n")
    )
    run, out = tmp_path / "run", tmp_path / "wb"
    with rldiag.Recorder(run) as rec:
        old = np.full((2, 4), -1.0, np.float32)
        rec.record(step=0, logprobs=old, old_logprobs=old, advantages=np.ones(2, np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "rldiag", "export", str(run), "--to", "wandb", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("rldiag export: error: W&B could not start a run: No API key configured")
    assert "WANDB_MODE=offline" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_trackio_local(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # the second export writes nothing new
        proc = subprocess.run(
            [sys.executable, "-m", "rldiag", "export", str(run_dir), "--to", "trackio", "proj"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
    code = (
        "import json,sys; from trackio.sqlite_storage import SQLiteStorage as S; "
        "print(json.dumps(S.get_logs('proj', 'exp1')))"
    )
    import json

    logs = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    metrics = rldiag.open_run(run_dir).step_metrics().sort("step")
    assert [r["step"] for r in logs] == metrics["step"].to_list()
    assert [r["kl/k3"] for r in logs] == pytest.approx(metrics["kl/k3"].to_list(), rel=1e-12)
    assert all(sum(r["hist/entropy"]["values"]) == 16 * 24 for r in logs)


def _attempt_steps(rec: rldiag.Recorder, span: range, noise: float, rng: np.random.Generator) -> None:
    """One attempt's steps of a job: log-ratios of ``noise``, so two attempts' steps differ."""
    for s in span:
        old = np.log(rng.uniform(0.05, 0.95, (4, 8))).astype(np.float32)
        lp = np.minimum(old + rng.normal(0, noise, old.shape), 0).astype(np.float32)
        rec.record(step=s, logprobs=lp, old_logprobs=old, advantages=np.ones(4, np.float32))


def test_follow_replaces_the_steps_a_restart_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`export --follow` had written steps 0-6 when the job, killed after step 7, resumed from its checkpoint at
    step 5: TensorBoard ends up with the resumed attempt's steps 5-9, as rldiag counts them."""
    pytest.importorskip("tensorboard")
    import threading

    run, tb = tmp_path / "live", tmp_path / "tb"
    rng = np.random.default_rng(0)

    def steps(rec: rldiag.Recorder, span: range, noise: float) -> None:
        _attempt_steps(rec, span, noise, rng)
        rec.flush()

    first = rldiag.Recorder(run, roll_steps=1)  # killed after step 7: never closed
    steps(first, range(8), 0.05)
    got: list[int] = []
    argv = ["export", str(run), "--to", "tensorboard", str(tb), "--follow", "--interval", "0.05"]
    thread = threading.Thread(target=lambda: got.append(main(argv)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # steps 0-6 exported (step 7 may still grow)
        if list(tb.glob("events.out.tfevents.*")) and "kl/k3" in _accumulator(tb).Tags()["scalars"]:
            if len(_accumulator(tb).Scalars("kl/k3")) == 7:
                break
        time.sleep(0.05)
    with rldiag.Recorder(run, roll_steps=1) as resumed:
        steps(resumed, range(5, 10), 0.3)
    thread.join(60)
    first.close()
    assert got == [0]
    kl = _accumulator(tb).Scalars("kl/k3")
    metrics = rldiag.open_run(run).step_metrics().sort("step")
    assert [e.step for e in kl] == list(range(10)) == metrics["step"].to_list()
    assert np.allclose([e.value for e in kl], metrics["kl/k3"].to_numpy(), rtol=1e-6)
    assert "cannot drop" not in capsys.readouterr().err


def test_an_export_after_a_restart_replaces_what_tensorboard_got_before_it(tmp_path: Path) -> None:
    """Steps 0-7 exported to TensorBoard; later the job, killed after step 7, resumed from its checkpoint at step 5.
    A new `rldiag export` (no --follow) sees that TensorBoard got steps 5-7 before that restart began (the events'
    wall time) and replaces them with the run as rldiag counts it; a second export changes nothing."""
    pytest.importorskip("tensorboard")
    run, tb = tmp_path / "run", tmp_path / "tb"
    rng = np.random.default_rng(0)

    def steps(rec: rldiag.Recorder, span: range, noise: float) -> None:
        _attempt_steps(rec, span, noise, rng)

    with rldiag.Recorder(run) as first:
        steps(first, range(8), 0.05)
    assert main(["export", str(run), "--to", "tensorboard", str(tb)]) == 0
    with rldiag.Recorder(run) as resumed:
        steps(resumed, range(5, 10), 0.3)
    for _ in range(2):
        assert main(["export", str(run), "--to", "tensorboard", str(tb)]) == 0
        kl = _accumulator(tb).Scalars("kl/k3")
        metrics = rldiag.open_run(run).step_metrics().sort("step")
        assert [e.step for e in kl] == list(range(10)) == metrics["step"].to_list()
        assert np.allclose([e.value for e in kl], metrics["kl/k3"].to_numpy(), rtol=1e-6)
