"""The data layer: run discovery, path-traversal refusal, incremental refresh, status, alerts, decoding."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HOSTILE
from synth import SPIKE_STEP, record_run

import rldiag
from app import data
from rldiag import runformat


def test_discovery_finds_nested_runs_and_a_single_run_folder(runs_root: Path):
    found = data.discover(runs_root)
    assert sorted(found) == ["grpo_full", "sweep/minimal"]
    assert data.discover(runs_root / "grpo_full") == {"grpo_full": (runs_root / "grpo_full").resolve()}


@pytest.mark.parametrize(
    "bad",
    [
        "../grpo_full",
        "..",
        "sweep/../../etc",
        "/etc/passwd",
        "sweep//minimal",
        "./grpo_full",
        "a\\..\\b",
        "grpo_full\x00",
        "",
        "C:/x",
        "sweep/minimal/..",
    ],
)
def test_traversal_and_malformed_run_ids_are_refused(runs_root: Path, bad: str):
    cat = data.Catalog(runs_root)
    with pytest.raises(data.UnknownRun):
        cat.resolve(bad)
    assert cat.valid_ids([bad, "grpo_full"]) == ["grpo_full"]


def test_a_symlink_out_of_the_served_folder_is_not_a_run(tmp_path: Path, runs_root: Path):
    served = tmp_path / "served"
    served.mkdir()
    os.symlink(runs_root / "grpo_full", served / "escape")
    cat = data.Catalog(served)
    assert cat.run_ids() == []
    with pytest.raises(data.UnknownRun):
        cat.resolve("escape")


def test_a_folder_that_is_not_a_run_is_unknown(runs_root: Path):
    cat = data.Catalog(runs_root)
    with pytest.raises(data.UnknownRun):
        cat.resolve("sweep")
    assert cat.resolve("sweep/minimal") == (runs_root / "sweep" / "minimal").resolve()


def test_update_reads_only_the_new_steps(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=3, close=False)
    st = data.Catalog(tmp_path).state("r")
    assert st.metrics()["step"].to_list() == [0, 1, 2]
    assert st.update().height == 0 and st.version == 0

    calls = []
    real = st.run.step_metrics

    def spy(*args, **kwargs):
        calls.append(kwargs.get("steps"))
        return real(*args, **kwargs)

    st.run.step_metrics = spy
    record_run(tmp_path / "r", steps=2, start=3, close=False, rec=rec)
    fresh = st.update()
    rec.close()
    assert fresh["step"].to_list() == [3, 4]
    assert calls == [[3, 4]]  # metrics computed for the new steps only
    assert st.metrics()["step"].to_list() == [0, 1, 2, 3, 4]
    assert st.version == 1


def test_status_live_stalled_finished(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=2, close=False)
    st = data.Catalog(tmp_path, stall_seconds=600).state("r")
    st.metrics()
    assert st.status() == "live"  # this process's recorder is open
    assert st.status(now=time.time() + 601) == "stalled"
    rec.close()
    writer = next((tmp_path / "r" / "writers").glob("*.json"))
    info = json.loads(writer.read_text())
    writer.write_text(json.dumps({**info, "closed": True}))
    assert st.status(now=time.time() + 10_000) == "finished"


def test_a_writer_whose_process_is_gone_ends_the_run(tmp_path: Path):
    record_run(tmp_path / "r", steps=1)
    writer = next((tmp_path / "r" / "writers").glob("*.json"))
    info = {**json.loads(writer.read_text()), "closed": None}  # as if the process died without closing
    writer.write_text(json.dumps({**info, "pid": 2**22 + 12345}))  # no such process
    st = data.Catalog(tmp_path).state("r")
    assert st.is_closed() and st.status() == "finished"
    writer.write_text(json.dumps({**info, "host": "another-machine", "pid": 2**22 + 12345}))
    assert not st.is_closed()


def test_alerts_jsonl_is_parsed_tolerantly(tmp_path: Path):
    path = tmp_path / "alerts.jsonl"
    events = [
        {
            "event": "firing",
            "rule": "kl_spike",
            "severity": "warn",
            "step": 5,
            "start_step": 5,
            "value": 0.02,
            "summary": HOSTILE,
            "time": 1.0,
        },
        {"event": "repeat", "rule": "kl_spike", "severity": "warn", "step": 9, "start_step": 5, "time": 2.0},
        {"event": "firing", "rule": "ess_collapse", "severity": "critical", "step": 6, "time": 3.0},
        {"event": "resolved", "rule": "ess_collapse", "severity": "critical", "step": 8, "time": 4.0},
        {"state": "firing", "name": "alias", "step": 7, "fingerprint": "f"},  # aliases rldiag never writes
    ]
    events = [{"fingerprint": "f", **e} for e in events]
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n[not json\n" + '{"event": "fir')
    read = runformat.read_alerts(path)
    assert len(read) == 4
    states = data.alert_states(read)
    assert states["kl_spike"]["state"] == "firing" and states["kl_spike"]["step"] == 9
    assert states["ess_collapse"]["state"] == "resolved"
    assert [e["step"] for e in data.firing_events(read)] == [5, 6]
    assert data.normalize_alert(read[0])["summary"] == HOSTILE


def test_alerts_are_reread_only_when_the_file_changes(tmp_path: Path):
    record_run(tmp_path / "r", steps=1)
    st = data.Catalog(tmp_path).state("r")
    assert st.alerts() == []
    (tmp_path / "r" / "alerts.jsonl").write_text(
        json.dumps({"event": "firing", "rule": "x", "step": 0, "fingerprint": "f"}) + "\n"
    )
    assert len(st.alerts()) == 1
    first = st.alerts()
    assert st.alerts() is first


def test_token_decoder_ids_tokenizer_and_failure(tokenizer_dir: Path, tmp_path: Path):
    assert data.TokenDecoder(None).decode([3, None]) == ["#3", "?"]
    dec = data.TokenDecoder(tokenizer_dir)
    assert dec.decode([2, 7]) == ["the", HOSTILE]
    broken = data.TokenDecoder(tmp_path)
    assert broken.decode([1]) == ["#1"] and "could not load tokenizer" in broken.error


def test_lr_histogram_counts_every_token_of_every_step(runs_root: Path):
    st = data.Catalog(runs_root).state("grpo_full")
    steps, centers, counts = st.lr_histogram()
    metrics = st.metrics()
    assert list(steps) == metrics["step"].to_list()
    np.testing.assert_allclose(counts.sum(axis=0), metrics["tokens/count"].to_numpy())
    assert counts.shape == (len(centers), len(steps))
    # the spike step has mass in a bin near |log-ratio| = 4
    big = centers > 3.0
    assert counts[big, list(steps).index(SPIKE_STEP)].sum() >= 1


def test_analysis_steps_are_evenly_spread_with_both_ends(tmp_path: Path):
    record_run(tmp_path / "r", steps=30, full=False)
    st = data.Catalog(tmp_path).state("r")
    picked = st.analysis_steps(limit=7)
    assert picked[0] == 0 and picked[-1] == 29 and len(picked) == 7
    assert st.analysis_steps(limit=100) == list(range(30))


def test_metrics_are_finalized_only_when_asked_for(tmp_path: Path):
    rec = record_run(tmp_path / "r", steps=3, close=False)
    st = data.Catalog(tmp_path).state("r")
    asked = []
    real = st.run.step_metrics

    def spy(*args, **kwargs):
        asked.append(kwargs.get("metrics"))
        return real(*args, **kwargs)

    st.run.step_metrics = spy
    first = st.metrics(["ratio/mean"])
    assert set(first.columns) == {"step", "tokens/count", "ratio/mean"}
    assert asked == [["tokens/count", "ratio/mean"]]
    more = st.metrics(["kl/k3", "ratio/mean"])
    assert asked[-1] == ["kl/k3"] and {"kl/k3", "ratio/mean"} <= set(more.columns)
    # new steps get exactly the columns computed so far, and match a full computation
    record_run(tmp_path / "r", steps=2, start=3, close=False, rec=rec)
    fresh = st.update()
    rec.close()
    assert fresh["step"].to_list() == [3, 4] and set(fresh.columns) == set(more.columns)
    calls = len(asked)
    full = st.metrics(["a-scalar/the-run-logged"])  # not in the registry: the full computation, once
    assert len(asked) == calls + 1 and asked[-1] is None
    assert st.metrics() is full and st.metrics(["another/unknown"]) is full and len(asked) == calls + 1
    import rldiag

    reference = rldiag.open_run(tmp_path / "r").step_metrics().sort("step")  # read from scratch
    assert len(full.columns) == reference.width
    np.testing.assert_allclose(
        full.select(reference.columns).to_numpy().astype(float), reference.to_numpy().astype(float), equal_nan=True
    )


def test_a_run_deleted_and_written_again_is_read_again(tmp_path: Path):
    """Published segments never change, so a file that disappears means the run was replaced (or a copy was
    removed): the library and the dashboard start over instead of keeping the old steps."""
    import shutil
    import warnings

    record_run(tmp_path / "r", steps=6)
    st = data.Catalog(tmp_path).state("r")
    before = st.metrics()
    assert before["step"].to_list() == list(range(6))
    shutil.rmtree(tmp_path / "r")
    record_run(tmp_path / "r", steps=3, seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = st.update()
    assert fresh["step"].to_list() == [0, 1, 2] and st.version == 1
    assert st.metrics()["step"].to_list() == [0, 1, 2]
    again = rldiag.open_run(tmp_path / "r").step_metrics()
    assert st.metrics().select(again.columns).equals(again)  # the new run's numbers, none of the old ones
    assert any("read again" in str(w.message) for w in caught)
    assert any("read again" in p.message for p in st.run.problems)
