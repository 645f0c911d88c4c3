"""Custom scalars (Recorder.log): exact per step, later call wins, ranks, restarts, names, alerts, export."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import rldiag
from rldiag.alerts.engine import Engine
from rldiag.alerts.rules import RuleError, parse_rules
from rldiag.record.scalars import SCALARS_DIR, check_name
from tests.analysis.test_io import _step_record


def _record(rec: rldiag.Recorder, step: int, attempt: int = 0) -> None:
    rec.record(step=step, **_step_record(step, attempt, rec.rank))


def test_logged_values_read_back_exactly_and_join_step_metrics(tmp_path: Path) -> None:
    values = {s: (1.0 / 3 + s, 1e-300 * s, float(np.float32(0.1) * s)) for s in range(6)}
    with rldiag.Recorder(tmp_path / "r", roll_steps=2) as rec:
        for s in range(6):
            _record(rec, s)
            loss, tiny, acc = values[s]
            rec.log(s, {"loss": loss, "lr": np.float64(tiny), "eval/acc": np.float32(acc)})
    run = rldiag.open_run(tmp_path / "r")
    assert run.custom.names() == ["eval/acc", "loss", "lr"]
    custom = run.custom_metrics()
    assert custom.columns == ["step", "eval/acc", "loss", "lr"] and custom["step"].to_list() == list(range(6))
    assert custom["loss"].to_list() == [values[s][0] for s in range(6)]  # bit for bit
    assert custom["lr"].to_list() == [values[s][1] for s in range(6)]
    # files named like the segments, published by the writer thread
    files = sorted(p.name for p in (tmp_path / "r" / SCALARS_DIR).iterdir())
    assert files and all(f.startswith(rec.writer_id) for f in files)
    # joined into step_metrics by default, and on request by name; registry columns unchanged
    full = run.step_metrics()
    assert full.columns[-3:] == ["eval/acc", "loss", "lr"]
    assert full["loss"].to_list() == custom["loss"].to_list()
    some = run.step_metrics(metrics=["kl/k3", "loss"], steps=slice(2, 4))
    assert some.columns == ["step", "kl/k3", "loss"] and some["step"].to_list() == [2, 3]
    plain = run.step_metrics(metrics=["kl/k3"])
    assert plain.columns == ["step", "kl/k3"]
    assert full.drop(["eval/acc", "loss", "lr"]).equals(run.step_metrics(metrics=[c for c in full.columns[1:-3]]))
    by_rank = run.step_metrics(metrics=["loss"], by_rank=True)
    assert by_rank.columns == ["step", "rank", "loss"] and by_rank["loss"].to_list() == custom["loss"].to_list()
    with pytest.raises(ValueError, match="no custom scalar 'los'"):
        run.custom_metrics(["los"])


def test_a_run_without_custom_scalars_is_unchanged(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        _record(rec, 1)
    run = rldiag.open_run(tmp_path / "r")
    assert not (tmp_path / "r" / SCALARS_DIR).exists()
    assert run.custom.names() == [] and run.custom_metrics().columns == ["step"]
    assert "loss" not in run.step_metrics().columns


def test_the_later_call_wins_and_a_step_without_records_is_kept_apart(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        _record(rec, 1)
        rec.log(1, {"loss": 1.0, "lr": 0.1})
        rec.flush()  # the first value is already published: the later call still wins
        rec.log(1, {"loss": 2.0})
        rec.log(7, {"eval/acc": 0.5})  # a step with no statistics
    run = rldiag.open_run(tmp_path / "r")
    c = run.custom_metrics()
    assert c["step"].to_list() == [1, 7]
    assert c.filter(pl.col("step") == 1).select("loss", "lr").row(0) == (2.0, 0.1)
    assert math.isnan(c.filter(pl.col("step") == 7)["loss"][0])
    sm = run.step_metrics(metrics=["loss", "eval/acc"])
    assert sm["step"].to_list() == [1]  # step_metrics keeps its rows: the steps with statistics


def test_several_ranks_mean_and_reductions(tmp_path: Path) -> None:
    recs = [rldiag.Recorder(tmp_path / "r", rank=r, world_size=2) for r in (0, 1)]
    for s in range(3):
        for rec in recs:
            _record(rec, s)
            rec.log(s, {"loss": float(10 * rec.rank + s)})
    recs[0].log(3, {"only0": 4.0})
    for rec in recs:
        rec.close()
    run = rldiag.open_run(tmp_path / "r")
    assert run.custom_metrics(["loss"])["loss"].to_list() == [5.0, 6.0, 7.0]
    assert run.custom_metrics(["loss"], reduce="sum")["loss"].to_list() == [10.0, 12.0, 14.0]
    assert run.custom_metrics(["loss"], reduce="max")["loss"].to_list() == [10.0, 11.0, 12.0]
    assert run.custom_metrics(["loss"], ranks=[1])["loss"].to_list() == [10.0, 11.0, 12.0]
    per = run.custom_metrics(["loss"], by_rank=True)
    assert per.select("step", "rank").rows() == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert run.custom_metrics(["only0"])["only0"].to_list() == [4.0]
    with pytest.raises(ValueError, match="reduce must be one of"):
        run.custom_metrics(reduce="median")  # type: ignore[arg-type]


def test_a_restarted_writer_supersedes_from_its_first_step(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        for s in range(10):
            _record(rec, s)
            rec.log(s, {"loss": 100.0 + s})
    with rldiag.Recorder(tmp_path / "r") as rec:  # a resume from step 5 (a checkpoint): steps 5.. again
        for s in range(5, 8):
            _record(rec, s, attempt=1)
            rec.log(s, {"loss": 200.0 + s})
    run = rldiag.open_run(tmp_path / "r")
    c = run.custom_metrics()
    # 0-4 from the first attempt; 5-7 from the second; 8-9 superseded (the second attempt went back to 5)
    assert c["step"].to_list() == list(range(8))
    assert c["loss"].to_list() == [100.0 + s for s in range(5)] + [200.0 + s for s in range(5, 8)]


def test_a_restart_that_only_logs_scalars_is_a_resume_point(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        for s in range(4):
            _record(rec, s)
            rec.log(s, {"loss": float(s)})
    with rldiag.Recorder(tmp_path / "r") as rec:
        rec.log(2, {"loss": -2.0})
    c = rldiag.open_run(tmp_path / "r").custom_metrics()
    assert c["loss"].to_list() == [0.0, 1.0, -2.0]


def test_names_and_values_are_checked_with_one_line_errors(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        for bad, err, pattern in [
            ({"kl/k3": 1.0}, ValueError, "name of an rldiag metric"),
            ({"entropy/mean": 1.0}, ValueError, "name of an rldiag metric"),
            ({"step": 1.0}, ValueError, "or column"),
            ({"custom:loss": 1.0}, ValueError, "log it as 'loss'"),
            ({"": 1.0}, ValueError, "1 to 200 characters"),
            ({" loss": 1.0}, ValueError, "leading or"),
            ({"a\nb": 1.0}, ValueError, "control characters"),
            ({"loss": "0.3"}, TypeError, "log a number"),
            ({"loss": None}, TypeError, "log a number"),
            ({"loss": [1.0, 2.0]}, TypeError, "one real number"),
            ({"loss": 1j}, TypeError, "one real number"),
            ({3: 1.0}, TypeError, "names are strings"),
        ]:
            with pytest.raises(err, match=pattern) as info:
                rec.log(1, {"fine": 1.0, **bad})
            assert "\n" not in str(info.value).replace("'a\\nb'", "")
        with pytest.raises(TypeError, match="mapping"):
            rec.log(1, [("loss", 1.0)])  # type: ignore[arg-type]
        for step in (-1, 1.5, True):
            with pytest.raises((TypeError, ValueError), match="step"):
                rec.log(step, {"loss": 1.0})  # type: ignore[arg-type]
        rec.log(1, {"ok": True, "int": 3, "np": np.int64(4), "inf": float("inf")})
    c = rldiag.open_run(tmp_path / "r").custom_metrics()
    assert c.columns == ["step", "inf", "int", "np", "ok"]  # nothing of the refused calls ("fine" neither)
    assert c.row(0) == (1, math.inf, 3.0, 4.0, 1.0)
    assert check_name("eval/acc") == "eval/acc"


def test_torch_scalars(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with rldiag.Recorder(tmp_path / "r") as rec:
        rec.log(1, {"loss": torch.tensor(0.25), "g": torch.tensor([[3.0]], dtype=torch.float64)})
        with pytest.raises(ValueError, match="shape"):
            rec.log(1, {"v": torch.ones(2)})
    assert rldiag.open_run(tmp_path / "r").custom_metrics().row(0) == (1, 3.0, 0.25)


def test_alert_rules_name_custom_scalars(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        for s in range(8):
            _record(rec, s)
            rec.log(s, {"eval/acc": 0.8 if s < 4 else 0.2})
    rules = parse_rules(
        {
            "include_defaults": False,
            "rules": {
                "acc_drop": {
                    "metric": "custom:eval/acc",
                    "op": "<",
                    "threshold": 0.5,
                    "resolve": 0.6,
                    "for": 2,
                    "summary": "eval accuracy {value:.2f} below {threshold:g} at step {step}",
                }
            },
        }
    )
    events = Engine(rules, run="r").update(rldiag.open_run(tmp_path / "r").step_metrics(), now=0.0)
    assert [(e.rule, e.event, e.step) for e in events] == [("acc_drop", "firing", 5)]
    assert events[0].summary == "eval accuracy 0.20 below 0.5 at step 5"
    with pytest.raises(RuleError, match="name of an rldiag metric"):
        parse_rules({"rules": {"x": {"metric": "custom:kl/k3", "threshold": 1}}})
    with pytest.raises(RuleError, match="custom scalar is named 'custom:<name>'"):
        parse_rules({"rules": {"x": {"metric": "eval/acc", "threshold": 1}}})


def test_export_to_tensorboard_includes_custom_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rldiag.cli import main

    with rldiag.Recorder(tmp_path / "r") as rec:
        for s in range(3):
            _record(rec, s)
            rec.log(s, {"loss": 0.5 + s})
    assert main(["export", str(tmp_path / "r"), "--to", "tensorboard", str(tmp_path / "tb")]) == 0
    acc = EventAccumulator(str(tmp_path / "tb")).Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.endswith("loss"))
    assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(0, 0.5), (1, 1.5), (2, 2.5)]


def test_unpublished_scalars_are_seen_live(tmp_path: Path) -> None:
    rec = rldiag.Recorder(tmp_path / "r", roll_steps=1000, roll_seconds=3600, live_seconds=0.01)
    try:
        for s in range(3):
            _record(rec, s)
            rec.log(s, {"loss": float(s)})
        _record(rec, 3)  # the next record rewrites the live tails, which now hold step 2's loss
        run = None
        for _ in range(200):  # the writer thread rewrites the tail at most every live_seconds
            run = rldiag.open_run(tmp_path / "r")
            if run.custom_metrics()["step"].to_list() == [0, 1, 2]:
                break
            time.sleep(0.05)
        assert run is not None and run.custom_metrics()["loss"].to_list() == [0.0, 1.0, 2.0]
        assert not (tmp_path / "r" / SCALARS_DIR).exists()  # nothing published yet: read from live/
    finally:
        rec.close()
    assert not list((tmp_path / "r" / "live").glob("*.scalars"))  # published: the tail is gone
    assert rldiag.open_run(tmp_path / "r").custom_metrics()["loss"].to_list() == [0.0, 1.0, 2.0]


def test_rldiag_watch_evaluates_a_rule_on_a_custom_scalar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rldiag.cli import main

    with rldiag.Recorder(tmp_path / "r") as rec:
        for s in range(6):
            _record(rec, s)
            rec.log(s, {"loss": 1.0 if s < 3 else 9.0})
    rules = tmp_path / "rules.toml"
    rules.write_text(
        'include_defaults = false\n[rules.loss_up]\nseverity = "critical"\nmetric = "custom:loss"\nop = ">"\n'
        'threshold = 5\nsummary = "loss {value:g} above {threshold:g} at step {step}"\n'
    )
    assert main(["watch", str(tmp_path / "r"), "--once", "--no-history", "--rules", str(rules)]) == 1
    assert "loss 9 above 5 at step 3" in capsys.readouterr().err


def test_cuda_scalars_never_sync_in_log(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    loss = torch.full((1,), 0.125, device="cuda", dtype=torch.float64)
    with rldiag.Recorder(tmp_path / "r") as rec:
        torch.cuda.set_sync_debug_mode("error")  # a synchronising call in log() raises
        try:
            rec.log(1, {"loss": loss, "half": loss.float() * 4})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.fill_(9.0)  # the logged value is a copy: changing the tensor afterwards does not change it
    assert rldiag.open_run(tmp_path / "r").custom_metrics().row(0) == (1, 0.5, 0.125)


def test_online_alerts_evaluate_custom_scalars_with_their_step(tmp_path: Path) -> None:
    from rldiag.alerts import AlertConfig

    rules = tmp_path / "rules.toml"
    rules.write_text(
        'include_defaults = false\n[rules.loss_up]\nmetric = "custom:loss"\nop = ">"\nthreshold = 5\nfor = 2\n'
        'summary = "loss {value:g} at step {step}"\n'
    )
    seen: list[tuple[str, int, str]] = []
    config = AlertConfig(
        rules=str(rules), console=False, callbacks=[lambda n: seen.append((n.event, n.step, n.summary))]
    )
    with rldiag.Recorder(tmp_path / "r", alerts=config) as rec:
        for s in range(8):
            _record(rec, s)
            rec.log(s, {"loss": 9.0 if s in (3, 4, 6) else 1.0})
        rec.alerts.flush(10)  # type: ignore[union-attr]
    assert [e for e in seen if e[0] == "firing"] == [("firing", 4, "loss 9 at step 4")]


def test_a_damaged_scalars_file_is_skipped_and_listed_by_info(tmp_path: Path) -> None:
    with rldiag.Recorder(tmp_path / "r") as rec:
        for s in range(3):
            _record(rec, s)
            rec.log(s, {"loss": float(s)})
            rec.flush()  # one scalars file per step
    files = sorted((tmp_path / "r" / SCALARS_DIR).iterdir())
    assert len(files) == 3
    files[0].write_bytes(b"not parquet")
    run = rldiag.open_run(tmp_path / "r")
    problems = run.info()["problems"]
    assert any(files[0].name in p and "custom scalars" in p for p in problems), problems
    assert run.custom_metrics()["step"].to_list() == [1, 2]  # the other files still read
