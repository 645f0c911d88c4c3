"""Write a run's step metrics (and histograms) into the experiment trackers people already use.

``rldiag export RUN --to tensorboard DIR | mlflow URI`` and ``Recorder(..., log_to=...)`` use these
exporters. Each writes every step metric (or a chosen set) at the run's own steps; where the tracker has
histograms (TensorBoard), the per-step log-ratio and entropy histograms too. Re-running an export writes
only the steps the tracker does not hold yet (each exporter reads back its last step), so points are never
duplicated. Each tracker is an optional extra; a missing one gives a one-line message naming the extra.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rldiag.runformat import complete_steps
from rldiag.storage import one_line

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "Exporter",
    "TensorBoardExporter",
    "MlflowExporter",
    "WandbExporter",
    "TrackioExporter",
    "make_exporter",
    "step_histograms",
    "export_steps",
    "HISTOGRAMS",
    "TRACKERS",
]

HISTOGRAMS: dict[str, str] = {"h_lr": "hist/log_ratio", "h_ent": "hist/entropy"}
"""Statistics histograms exported, and the tag each gets: the signed log-ratio and the entropy."""

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


def _missing(extra: str, module: str) -> ImportError:
    return ImportError(f"exporting to {extra} needs the {module} package: pip install 'rldiag[{extra}]'")


def bin_edges(n_bins: int) -> np.ndarray:
    """The ``n_bins + 1`` edges of a histogram of rldiag.stats.hist (magnitude or signed layout); the open
    overflow bins are closed at ``2**11`` (twice the last finite edge) so trackers can draw them."""
    from rldiag.stats import hist

    top = 2.0 ** (hist.MAX_EXP + 1)
    mag = np.concatenate([[0.0], hist._MAG_EDGES, [top]])  # underflow, log bins, overflow
    if n_bins == hist.N_MAG:
        return mag
    if n_bins == hist.N_SIGNED:
        return np.concatenate([-mag[::-1], mag[1:]])
    raise ValueError(f"no histogram layout with {n_bins} bins")


def bucket_limits(n_bins: int) -> np.ndarray:
    """Upper edge of each histogram bin (TensorBoard's ``bucket_limit``)."""
    return bin_edges(n_bins)[1:]


def trimmed(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(counts, edges)`` of the occupied range of a dense histogram (None when it is empty)."""
    nz = np.nonzero(counts)[0]
    if not len(nz):
        return None
    lo, hi = int(nz[0]), int(nz[-1])
    return counts[lo : hi + 1], bin_edges(len(counts))[lo : hi + 2]


def step_histograms(stats_table: pa.Table, steps: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """Dense per-step counts of the exported histograms, summed over the rows of each step (records, or a run's
    rows already merged per step: ``Run.compact_table()``)."""
    from rldiag.stats.kernel import HISTS

    if not steps or stats_table.num_rows == 0:
        return {}
    want = {int(s): i for i, s in enumerate(sorted(set(int(s) for s in steps)))}
    step_col = np.asarray(stats_table.column("step").to_numpy(zero_copy_only=False), dtype=np.int64)
    out: dict[int, dict[str, np.ndarray]] = {s: {} for s in want}
    for name in HISTOGRAMS:
        if f"{name}.idx" not in stats_table.column_names:
            continue
        n_bins = HISTS[name]
        dense = np.zeros((len(want), n_bins))
        idx_col = stats_table.column(f"{name}.idx").to_pylist()
        cnt_col = stats_table.column(f"{name}.cnt").to_pylist()
        for row, step in enumerate(step_col):
            g = want.get(int(step))
            if g is None or idx_col[row] is None:
                continue
            np.add.at(dense[g], np.asarray(idx_col[row], dtype=np.int64), np.asarray(cnt_col[row], dtype=float))
        for s, g in want.items():
            out[s][name] = dense[g]
    return out


class Exporter:
    """One tracker destination. Subclasses implement :meth:`last_step`, :meth:`write` and :meth:`close`."""

    name = "exporter"
    histograms = False
    """Whether the tracker takes histograms (then :meth:`write` gets them)."""

    def last_step(self) -> int | None:
        """The newest step the tracker already holds for this run (None: nothing yet)."""
        raise NotImplementedError

    def write(self, step: int, metrics: Mapping[str, float], hists: Mapping[str, np.ndarray] | None = None) -> None:
        """Write one step's metrics (finite values only) and, if supported, histograms."""
        raise NotImplementedError

    def written_at(self, step: int) -> float | None:
        """When the tracker got the newest of the steps it holds from ``step`` on (seconds since the epoch), or
        None when it cannot say: an export that starts after a restart then cannot tell whether those steps came
        from the attempt the restart replaced."""
        return None

    def replace_from(self, step: int) -> bool:
        """A job restarted from a checkpoint resumes at ``step`` while the tracker already holds steps from there
        on, written by the attempt the restart replaced: make the tracker drop them so that the resumed attempt's
        steps are written in their place. False where the tracker cannot drop a step it holds (MLflow, W&B and
        trackio): those steps then keep the earlier attempt's numbers there."""
        return False

    def flush(self) -> None:
        """Make what was written visible to readers."""

    def close(self) -> None:
        """Flush and release (idempotent)."""


def replace_from(exp: Exporter, step: int) -> str | None:
    """A job restarted from a checkpoint resumed at ``step``, after ``exp`` got steps from there on from the attempt
    the restart replaced: the tracker drops them if it can (:meth:`Exporter.replace_from`; then the resumed steps
    are written in their place). Otherwise returns what to tell the user: which steps keep the earlier numbers.
    None when the tracker holds nothing from ``step`` on, or dropped it."""
    last = exp.last_step()
    if last is None or step > last or exp.replace_from(step):
        return None
    return (
        f"the job resumed at step {step}, but {exp.name} already holds steps {step}..{last} from the attempt it "
        "replaces and cannot drop a step: there they keep that attempt's numbers (rldiag counts the resumed "
        "attempt's; `rldiag export` into a new target writes them)"
    )


def export_pass(
    run: Any,
    exporter: Exporter,
    seen: set[tuple[int, int, str]] | None,
    *,
    closed: bool,
    metrics: Sequence[str] | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, set[tuple[int, int, str]], str | None]:
    """One pass of a follower (``rldiag export --follow``, a multi-rank recorder's live export) over ``run`` as
    it was last read: first what a restart replaced (:func:`replace_from`; on the first pass, ``seen`` None, the
    steps the tracker got before a restart of the run began, later those of a restart the run shows since
    ``seen``), then the steps complete on every rank (all of them once ``closed``) newer than the tracker holds.

    Returns (steps written, the run's restarts now: the next pass's ``seen``, what to tell the user when a tracker
    cannot drop the replaced steps, else None)."""
    restarts = set(run.resume.restart_keys())
    if seen is None:
        fresh = sorted(
            int(x["step"])
            for x in run.resume.restarts
            if x.get("started") is not None
            and (t := exporter.written_at(int(x["step"]))) is not None
            and t < float(x["started"])
        )
    else:
        fresh = sorted(step for _, step, _ in restarts - seen)
    note = replace_from(exporter, int(fresh[0])) if fresh else None
    steps = complete_steps(run, after=exporter.last_step(), closed=closed)  # a live step may grow
    return export_steps(run, exporter, metrics=metrics, steps=steps, stop=stop), restarts, note


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[k] = f
    return out


def _wait_for_a_later_second(logdir: Path) -> None:
    """Wait until the clock's second is later than that of every event file in ``logdir``.

    TensorBoard reads a directory's event files in the order of their names: ``events.out.tfevents.`` then the
    second the file was created in (ten digits), then host, process id and a counter, compared as text. A file
    created in the same second as one already there can sort before it (counter 10 before 9), and its events
    are then read first: a later export's steps ahead of the earlier ones, which TensorBoard takes for a restart
    of the job and purges. A new file created in a later second always sorts last (at most a one-second wait,
    only when an export into the same directory began in this second)."""
    newest = -1
    for p in logdir.glob("events.out.tfevents.*"):
        field = p.name.split(".")[3]
        if field.isdigit():
            newest = max(newest, int(field))
    while int(time.time()) <= newest:
        time.sleep(max(0.01, newest + 1 - time.time()))


class TensorBoardExporter(Exporter):
    """Event files in ``logdir`` (``tensorboard`` package; no torch needed): a scalar per metric, the
    metric's rldiag name as tag, and ``hist/log_ratio`` / ``hist/entropy`` histograms.

    A second export into the same ``logdir`` reads the steps already there (TensorBoard's
    ``EventAccumulator``) and writes only newer ones.
    """

    name = "tensorboard"
    histograms = True

    def __init__(self, logdir: str | Path):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.logdir = Path(logdir)
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._written: dict[int, float] = {}  # step -> wall time of its newest event already in logdir
        self._last = self._read_last_step()
        self.logdir.mkdir(parents=True, exist_ok=True)
        _wait_for_a_later_second(self.logdir)
        self._writer = EventFileWriter(str(self.logdir))
        self._closed = False

    def _read_last_step(self) -> int | None:
        if not self.logdir.is_dir() or not any(self.logdir.glob("events.out.tfevents.*")):
            return None
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(self.logdir), size_guidance={"scalars": 0, "histograms": 1})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                self._written[e.step] = max(self._written.get(e.step, 0.0), e.wall_time)
        return max(self._written) if self._written else None

    def written_at(self, step: int) -> float | None:
        """When the newest of the steps it holds from ``step`` on was written (the events' wall time)."""
        times = [t for s, t in self._written.items() if s >= step]
        return max(times) if times else None

    def last_step(self) -> int | None:
        return self._last

    def replace_from(self, step: int) -> bool:
        """TensorBoard's own resume rule (``SummaryWriter(purge_step=...)``): a ``SessionLog.START`` event at
        ``step`` makes its readers drop every event at or after ``step`` written before it."""

        start = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=int(step), session_log=start))
        self._writer.flush()
        self._last = int(step) - 1
        self._written = {s: t for s, t in self._written.items() if s < step}
        return True

    def write(self, step: int, metrics: Mapping[str, float], hists: Mapping[str, np.ndarray] | None = None) -> None:
        pb = self._summary_pb2
        values = [pb.Summary.Value(tag=k, simple_value=v) for k, v in _finite(metrics).items()]
        for name, counts in (hists or {}).items():
            t = trimmed(counts)
            if t is None:
                continue
            c, edges = t
            mids = _mids(len(counts))[np.nonzero(counts)[0][0] :][: len(c)]
            proto = pb.HistogramProto(
                min=float(edges[0]),
                max=float(edges[-1]),
                num=float(c.sum()),
                sum=float((mids * c).sum()),
                sum_squares=float((mids * mids * c).sum()),
                bucket_limit=[float(x) for x in edges[1:]],
                bucket=[float(x) for x in c],
            )
            values.append(pb.Summary.Value(tag=HISTOGRAMS.get(name, name), histo=proto))

        event = self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=pb.Summary(value=values))
        self._written[int(step)] = event.wall_time
        self._writer.add_event(event)
        self._last = int(step) if self._last is None else max(self._last, int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()


def _mids(n_bins: int) -> np.ndarray:
    from rldiag.stats import hist

    return np.asarray(hist.representative(n_bins), dtype=np.float64)


class MlflowExporter(Exporter):
    """An MLflow run (``mlflow-skinny``): one metric per rldiag metric, at the run's steps.

    ``uri`` is the tracking URI (``sqlite:///mlflow.db``, a server ``http://127.0.0.1:5000``). The MLflow run
    is found again by its tag ``rldiag.run`` in ``experiment`` (created when absent), so a second export
    continues it and writes only newer steps. Metric names keep rldiag's ``/`` (MLflow's SQLite and server
    stores accept it; its file store does not, which is why a file URI is refused). No histograms: MLflow has
    none.
    """

    name = "mlflow"

    def __init__(self, uri: str, run: str, *, experiment: str = "rldiag"):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow-skinny") from None
        if uri.startswith("file:") or "://" not in uri:
            raise ValueError(
                f"MLflow URI {uri!r}: use a database (sqlite:///path/mlflow.db) or a tracking server "
                "(http://...); MLflow's file store cannot hold rldiag's metric names (they contain '/')"
            )
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`rldiag.run` = '{_quote(run)}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(self.experiment_id, tags={"rldiag.run": run}, run_name=run).info.run_id
        self._last = self._read_last_step()
        self._closed = False

    def _read_last_step(self) -> int | None:
        run = self.client.get_run(self.run_id)
        keys = list(run.data.metrics)
        if not keys:
            return None
        hist = self.client.get_metric_history(self.run_id, keys[0])
        return max((m.step for m in hist), default=None)

    def last_step(self) -> int | None:
        return self._last

    def write(self, step: int, metrics: Mapping[str, float], hists: Mapping[str, np.ndarray] | None = None) -> None:

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, int(step)) for k, v in _finite(metrics).items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        self._last = int(step) if self._last is None else max(self._last, int(step))

    def close(self) -> None:
        self._closed = True


def _quote(s: str) -> str:
    return s.replace("'", "\\'")


class WandbExporter(Exporter):
    """A W&B run (``wandb``): ``wandb.log`` at the run's steps, ``hist/log_ratio`` and ``hist/entropy`` as
    ``wandb.Histogram``. The W&B run id is derived from the rldiag run name (``rldiag-<name>``) and resumed, so a
    second export continues it; the last exported step is kept beside the W&B files
    (``<dir>/rldiag-export-<id>.json``) because an offline run cannot be queried. ``WANDB_MODE=offline``
    writes locally (``wandb sync`` uploads later).
    """

    name = "wandb"
    histograms = True

    def __init__(self, run: str, *, project: str = "rldiag", dir: str | Path | None = None):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self._wandb = wandb
        self.dir = Path(dir) if dir is not None else Path.cwd()
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.id = "rldiag-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in run)[:100]
        self._state = self.dir / f"rldiag-export-{self.id}.json"
        self._last: int | None = None
        if self._state.exists():
            import json

            self._last = json.loads(self._state.read_text()).get("last_step")
        try:
            self.run = wandb.init(
                project=project, id=self.id, name=run, dir=str(self.dir), resume="allow", config={"rldiag.run": run}
            )
        except wandb.errors.Error as exc:  # no API key, no network...: one line that says what to do
            if created and not any(self.dir.iterdir()):
                self.dir.rmdir()  # nothing left behind by an export that did not start
            raise ValueError(
                f"W&B could not start a run: {one_line(exc).rstrip('.')}. To write it locally instead: "
                "WANDB_MODE=offline (`wandb sync` uploads it later)"
            ) from None
        self._closed = False

    def last_step(self) -> int | None:
        return self._last

    def write(self, step: int, metrics: Mapping[str, float], hists: Mapping[str, np.ndarray] | None = None) -> None:
        data: dict[str, Any] = dict(_finite(metrics))
        for name, counts in (hists or {}).items():
            t = trimmed(counts)
            if t is not None:
                data[HISTOGRAMS.get(name, name)] = self._wandb.Histogram(np_histogram=(t[0], t[1]))
        self.run.log(data, step=int(step))
        self._last = int(step) if self._last is None else max(self._last, int(step))

    def flush(self) -> None:
        import json

        if self._last is not None:
            tmp = self._state.with_suffix(".tmp")
            tmp.write_text(json.dumps({"last_step": self._last}))
            os.replace(tmp, self._state)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()
            self.flush()


class TrackioExporter(Exporter):
    """A trackio run (``trackio``, local by default: ``TRACKIO_DIR``): ``trackio.log`` at the run's steps, the
    histograms as ``trackio.Histogram``. The trackio run is named after the rldiag run and resumed; its last
    step is read back from trackio's own store."""

    name = "trackio"
    histograms = True

    def __init__(self, run: str, *, project: str = "rldiag"):
        try:
            import trackio
            from trackio.sqlite_storage import SQLiteStorage
        except ImportError:
            raise _missing("trackio", "trackio") from None
        self._trackio = trackio
        self.project, self.name_ = project, run
        self._last = SQLiteStorage.get_max_step_for_run(project, run)
        self.run = trackio.init(project=project, name=run, resume="allow")
        self._closed = False

    def last_step(self) -> int | None:
        return None if self._last is None else int(self._last)

    def write(self, step: int, metrics: Mapping[str, float], hists: Mapping[str, np.ndarray] | None = None) -> None:
        data: dict[str, Any] = dict(_finite(metrics))
        for name, counts in (hists or {}).items():
            t = trimmed(counts)
            if t is not None:
                data[HISTOGRAMS.get(name, name)] = self._trackio.Histogram(np_histogram=(t[0], t[1]))
        self.run.log(data, step=int(step))
        self._last = int(step) if self._last is None else max(int(self._last), int(step))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


def make_exporter(kind: str, target: str | None, run: str) -> Exporter:
    """An exporter by tracker name: ``tensorboard`` DIR, ``mlflow`` URI, ``wandb`` [DIR], ``trackio`` [PROJECT]."""
    if kind == "tensorboard":
        if not target:
            raise ValueError("--to tensorboard needs a log directory: --to tensorboard DIR")
        return TensorBoardExporter(target)
    if kind == "mlflow":
        if not target:
            raise ValueError("--to mlflow needs a tracking URI: --to mlflow sqlite:///mlflow.db")
        return MlflowExporter(target, run)
    if kind == "wandb":
        return WandbExporter(run, dir=target)
    if kind == "trackio":
        return TrackioExporter(run, project=target or "rldiag")
    raise ValueError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")


def select_metrics(columns: Iterable[str], chosen: Sequence[str] | None) -> list[str]:
    """The metric columns to export: all (but ``step``) or the chosen ones (each must exist)."""
    cols = [c for c in columns if c != "step"]
    if not chosen:
        return cols
    missing = [c for c in chosen if c not in cols]
    if missing:
        raise ValueError(f"unknown metric {missing[0]!r}; the run has e.g. {', '.join(cols[:6])}")
    return list(chosen)


def export_steps(
    run: Any,
    exporter: Exporter,
    *,
    metrics: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Write the run's steps newer than what ``exporter`` holds; returns how many steps were written. Once
    ``stop`` is set no further step is begun, so a tracker never holds part of a step (a later export resumes
    after the last step it holds)."""
    last = exporter.last_step()
    todo = [s for s in (run.steps() if steps is None else steps) if last is None or s > last]
    if not todo:
        return 0
    frame = run.step_metrics(steps=todo).sort("step")
    names = select_metrics(frame.columns, metrics)
    # merged per step, live tails included: the steps a follower exports may not be in a segment yet
    hists = step_histograms(run.compact_table(), todo) if exporter.histograms else {}
    written = 0
    for row in frame.select(["step", *names]).iter_rows(named=True):
        if stop is not None and stop.is_set():
            break
        step = int(row.pop("step"))
        exporter.write(step, row, hists.get(step))
        written += 1
    exporter.flush()
    return written
