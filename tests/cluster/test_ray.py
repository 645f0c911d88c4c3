"""A verl-shaped job on a two-node Ray cluster: four actors record one run on S3, one is SIGKILLed and restarted
from a checkpoint; then the run is analysed on the same cluster with ``engine="ray"``.

Slow (a Ray cluster starts in a few seconds): one cluster for the module, one job for both tests.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import rldiag
from tests.analysis.test_io import _same_metrics

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

WORLD, STEPS, KILLED, RESTART = 4, 10, 2, 4
"""Four ranks record steps 0..9; rank 2 is killed after step 5 and restarts from its checkpoint at step 4."""
B, T, V = 8, 12, 6


def toy_step(params: np.ndarray, rank: int, step: int, attempt: int) -> tuple[dict, np.ndarray]:
    """One policy-gradient step of a softmax policy over V tokens (GRPO-style groups of 4): the record the
    trainer logs, and the updated parameters. The data depend on (rank, step, attempt): a replayed step
    samples other responses, as a restarted job does."""
    rng = np.random.default_rng([rank, step, attempt])
    logits_old = params.copy()
    p_old = np.exp(logits_old - logits_old.max())
    p_old /= p_old.sum()
    tokens = rng.choice(V, size=(B, T), p=p_old)
    lengths = rng.integers(3, T + 1, B)
    mask = np.arange(T)[None, :] < lengths[:, None]
    reward = ((tokens == 0) & mask).sum(1) / lengths
    groups = np.arange(B) // 4
    mean = np.array([reward[groups == g].mean() for g in groups])
    std = np.array([reward[groups == g].std() for g in groups]) + 1e-6
    adv = (reward - mean) / std
    grad = np.zeros(V)
    for b in range(B):
        for t in range(lengths[b]):
            onehot = np.eye(V)[tokens[b, t]]
            grad += adv[b] * (onehot - p_old)
    new = params + 0.5 * grad / mask.sum()
    logz_old = np.log(np.exp(logits_old).sum())
    logz_new = np.log(np.exp(new).sum())
    p_new = np.exp(new - logz_new)
    record = {
        "logprobs": (new[tokens] - logz_new).astype(np.float32),
        "old_logprobs": (logits_old[tokens] - logz_old).astype(np.float32),
        "advantages": adv.astype(np.float32),
        "mask": mask,
        "group_ids": groups.astype(np.int64),
        "rewards": reward.astype(np.float32),
        "entropy": np.full((B, T), -(p_new * np.log(p_new)).sum(), dtype=np.float32),
    }
    return record, new


@ray.remote(num_cpus=0)
class Trainer:
    """One rank of the job: a toy trainer that records every step and checkpoints its parameters."""

    def __init__(self, uri: str, rank: int, ckpt: str, attempt: int, start: int) -> None:
        self.rank, self.ckpt, self.attempt, self.start = rank, Path(ckpt), attempt, start
        self.params = np.load(self.ckpt / f"r{rank}-s{start}.npy") if start else np.zeros(V)
        self.rec = rldiag.Recorder(uri, rank=rank, world_size=WORLD, roll_steps=1, handle_signals=False)

    def pid(self) -> int:
        return os.getpid()

    def train(self, until: int, pause: float = 0.0) -> int:
        for step in range(self.start, until):
            np.save(self.ckpt / f"r{self.rank}-s{step}.npy", self.params)  # the checkpoint a restart loads
            record, self.params = toy_step(self.params, self.rank, step, self.attempt)
            half = {k: v[: B // 2] for k, v in record.items()}
            rest = {k: v[B // 2 :] for k, v in record.items()}
            self.rec.record(step=step, **half)
            if pause:  # the rank that will be killed publishes each micro-batch: a kill from here on is mid-step
                self.rec.flush()
                time.sleep(pause)
            self.rec.record(step=step, **rest)
            if pause:
                self.rec.flush()
            (self.ckpt / f"r{self.rank}-done-{step}").touch()
        self.rec.close()
        return until


def _reference(path: Path) -> rldiag.analysis.io.Run:
    """One process recording the surviving records: rank 2's attempt 0 up to step 3, its attempt 1 from 4."""
    for rank in range(WORLD):
        params = np.zeros(V)
        with rldiag.Recorder(path, rank=rank, world_size=WORLD, handle_signals=False) as rec:
            for step in range(STEPS):
                attempt = 1 if rank == KILLED and step >= RESTART else 0
                record, params = toy_step(params, rank, step, attempt)
                rec.record(step=step, **{k: v[: B // 2] for k, v in record.items()})
                rec.record(step=step, **{k: v[B // 2 :] for k, v in record.items()})
    return rldiag.open_run(path)


@pytest.fixture(scope="module")
def job(ray_cluster, s3_server, tmp_path_factory) -> str:
    """Runs the job once: returns the run's URI."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="verl-job")
    uri = "s3://verl-job/runs/grpo"
    ckpt = tmp_path_factory.mktemp("ckpt")
    actors = [Trainer.remote(uri, r, str(ckpt), 0, 0) for r in range(WORLD)]
    victim_pid = ray.get(actors[KILLED].pid.remote())
    runs = [a.train.remote(STEPS, pause=0.3 if r == KILLED else 0.0) for r, a in enumerate(actors)]
    deadline = time.monotonic() + 120
    while not (ckpt / f"r{KILLED}-done-5").exists():
        assert time.monotonic() < deadline, "rank 2 did not reach step 5"
        time.sleep(0.05)
    time.sleep(0.1)  # inside step 6: its first micro-batch is published, the second not yet
    os.kill(victim_pid, signal.SIGKILL)
    done = [ray.get(r) for i, r in enumerate(runs) if i != KILLED]
    assert done == [STEPS] * (WORLD - 1)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(runs[KILLED])
    _watch_once(uri, ckpt / "rules.toml", "before")  # an alert watcher evaluates the run as it stands
    # the scheduler restarts rank 2 from its checkpoint of step 4, as a new process
    restarted = Trainer.remote(uri, KILLED, str(ckpt), 1, RESTART)
    assert ray.get(restarted.train.remote(STEPS)) == STEPS
    _watch_once(uri, ckpt / "rules.toml", "after")  # ...and again after the restart, as a new watcher
    return uri


WATCHED: dict[str, list[str]] = {}
"""The notification lines each `rldiag watch --once` of the job printed (before and after the restart)."""
RULES = """
include_defaults = false
[rules.tokens_seen]
severity = "warn"
metric = "tokens/count"
op = ">"
threshold = 0
summary = "tokens at step {step}"
"""
"""A rule that fires at step 0 and stays firing: a watcher that forgot its history would notify it again."""


def _watch_once(uri: str, rules: Path, label: str) -> None:
    """``rldiag watch URI --once`` in a subprocess (a new process each time, as a restarted watcher is)."""
    import subprocess
    import sys

    rules.write_text(RULES)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-m", "rldiag", "watch", uri, "--once", "--rules", str(rules), "--fail-on", "never"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    WATCHED[label] = [x for x in out.stderr.splitlines() if x.startswith("[rldiag alert]")]


def test_a_restarted_rank_on_s3_merges_like_one_process_of_the_surviving_records(job, tmp_path) -> None:
    run = rldiag.open_run(job)
    assert run.ranks == list(range(WORLD)) and run.steps() == list(range(STEPS))
    assert not run.problems
    sup = run.info()["superseded"]
    assert [(x["rank"], x["from_step"]) for x in sup] == [(KILLED, RESTART)] and sup[0]["to_step"] >= 5
    want = _reference(tmp_path / "ref")
    _same_metrics(run.step_metrics(), want.step_metrics(), rtol=1e-9)
    _same_metrics(run.step_metrics(by_rank=True), want.step_metrics(by_rank=True), rtol=1e-9)
    assert run.step_metrics()["tokens/count"].to_list() == want.step_metrics()["tokens/count"].to_list()


def test_alerts_that_fired_before_the_restart_are_not_repeated(job) -> None:
    """The watcher after the restart reads the first watcher's history (whole objects in alerts/ on S3) and
    notifies nothing that fired before; the history holds one firing of the rule, at step 0."""
    assert any(" FIRING " in x and "tokens_seen" in x and "step=0" in x for x in WATCHED["before"]), WATCHED
    assert not [x for x in WATCHED["after"] if "tokens_seen" in x], WATCHED["after"]
    events = rldiag.open_run(job).alerts()
    firing = [(e["rule"], e["step"]) for e in events if e["event"] == "firing"]
    assert firing == [("tokens_seen", 0)], events


def test_analysis_on_ray_equals_the_local_engine(job, ray_cluster) -> None:
    run = rldiag.open_run(job)
    cfg = run.config.replace(eps_high=0.35, eps_low=0.1)
    for kw in ({"config": cfg, "by_rank": True}, {"from_tokens": True}):
        local = run.step_metrics(**kw)
        remote = run.step_metrics(**kw, engine="ray", ray_address=ray_cluster)
        assert remote.equals(local), kw  # the same row-group jobs, joined in the same order: bit-identical
    assert run.bucket_metrics(by="pos", width=3, steps=[2, 5, 7], engine="ray").equals(
        run.bucket_metrics(by="pos", width=3, steps=[2, 5, 7])
    )
    _same_metrics(run.lens(engine="ray"), run.lens(), rtol=1e-12)
    # the cluster had two nodes throughout
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2


def test_cli_engine_ray_prints_what_the_local_engine_prints(job, ray_cluster, capsys) -> None:
    from rldiag.cli import main

    outs = []
    for extra in ([], ["--engine", "ray", "--ray-address", ray_cluster]):
        assert main(["summarize", job, "--eps-high", "0.35", "--format", "csv", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].count("\n") == STEPS + 1


def test_cliff_on_ray_equals_the_local_engine(ray_cluster, tmp_path, capsys) -> None:
    from rldiag.cli import main

    rng = np.random.default_rng(1)
    with rldiag.Recorder(tmp_path / "distill", roll_steps=2, handle_signals=False) as rec:
        for step in range(6):
            logp = np.log(rng.uniform(0.3, 0.99, (8, 16))).astype(np.float32)
            rec.record(
                step=step,
                logprobs=logp,
                old_logprobs=logp,
                advantages=np.ones(8, np.float32),
                teacher_logprobs=np.log(rng.uniform(0.85, 0.999, (8, 16))).astype(np.float32),
                base_logprobs=np.log(rng.uniform(0.5, 0.95, (8, 16))).astype(np.float32),
            )
    run = rldiag.open_run(tmp_path / "distill")
    local = run.cliff(2.0, steps=[1, 2, 4])
    assert local.height == 3
    remote = run.cliff(2.0, steps=[1, 2, 4], engine="ray", ray_address=ray_cluster)
    assert remote["cliff/severity"].to_list() == local["cliff/severity"].to_list()
    numeric = [c for c, t in local.schema.items() if t.is_numeric()]
    _same_metrics(remote.select(numeric), local.select(numeric), rtol=1e-12)  # polars sums: order may differ
    outs = []
    for extra in ([], ["--engine", "ray", "--ray-address", ray_cluster]):
        assert main(["cliff", str(tmp_path / "distill"), "--lam", "2", *extra]) == 0  # the table: 4 digits
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "worst: critical" in outs[0]
