"""The dashboard's data layer: which runs exist, safe run-id resolution, and cached loaders.

Every callback gets its data here and nowhere else. A :class:`Catalog` is bound to one served folder; run ids
are paths relative to it (``"sweep/lr3e-6"``) and resolve only to run directories discovered *under* it, so a
URL such as ``?run=../../etc`` is refused (:class:`UnknownRun`). Each run is opened once and its step metrics
are cached; :meth:`RunState.update` reads only files that appeared since the last call (``run.refresh()``) and
computes metrics only for the new steps, which is what makes a live tick cheap.

The catalog of the running app lives in ``flask.current_app.extensions["rldiag"]``; :func:`catalog` returns it
inside a request and the most recently configured one outside (tests, benchmarks).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from app import security
from rldiag import runformat, schema, storage
from rldiag.analysis.io import Run

STALL_SECONDS = runformat.STALL_SECONDS
"""A run that is still open and has had no new step for this long is *stalled* (docs/alerts.md)."""
MAX_TOKEN_STEPS = 200
"""Token-row analyses (objective lens, position buckets) use at most this many steps of a long run..."""
TOKEN_ROW_BUDGET = 1_500_000
"""... and at most about this many token rows (measured: ~2 s for the position table on 2 cores)."""
MIN_TOKEN_STEPS = 20
ALWAYS = ("tokens/count",)
"""Metrics every cached run finalizes (the Runs page's token count; the token-row budget)."""
MAX_CACHED_VIEWS = 64
"""Derived views (heatmaps, bucket tables of zoomed ranges) cached per run before the cache starts over."""
_SKIP_DIRS = {runformat.TOKENS_DIR, runformat.STATS_DIR, runformat.WRITERS_DIR, runformat.TOKENIZER_DIR, "__pycache__"}
_MAX_DEPTH = 4
DISCOVERY_MAX_AGE = 2.0
"""Seconds a discovery (folder walk) is reused by default."""
RESCAN_SECONDS = 1.0
"""A folder is never walked twice within this many seconds, whatever asks (unknown ids, refresh clicks)."""


class UnknownRun(LookupError):
    """A run id that does not name a run under the served folder (or tries to leave it)."""


# --- catalog ---------------------------------------------------------------------------------------
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain relative path (no ``..``, no absolute path, no control characters).

    This is a first filter only; :meth:`Catalog.resolve` also requires the id to name a discovered run and
    its real path to lie under the served folder.
    """
    if not isinstance(run_id, str) or not run_id or len(run_id) > 512 or _BAD_CHARS.search(run_id):
        raise UnknownRun(f"not a run id: {run_id!r}")
    if run_id.startswith("/") or any(part in ("", ".", "..") for part in run_id.split("/")):
        raise UnknownRun(f"not a run id: {run_id!r}")
    return run_id


def discover(root: storage.Location) -> dict[str, storage.Location]:
    """Run directories under ``root`` (``root`` itself if it is a run), keyed by run id.

    Symbolic links are not followed, hidden folders and a run's own sub-folders are skipped.
    """
    root = root.resolve()
    if runformat.is_run_dir(root):
        return {root.name: root}
    if storage.is_remote(root):  # a folder of runs on object storage: one level, one listing
        return {c.name: c for c in root.iterdir() if runformat.is_run_dir(c)}
    root = cast(Path, root)  # a local folder from here on
    found: dict[str, storage.Location] = {}
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if here != root and runformat.is_run_dir(here):
            found[here.relative_to(root).as_posix()] = here
            dirnames[:] = []
            continue
        if len(here.parts) - base_depth >= _MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")) and d not in _SKIP_DIRS)
    return found


class Catalog:
    """The runs of one served folder and their cached state.

    ``opener`` opens a run directory (default :func:`rldiag.open_run`); ``tokenizer`` is a local tokenizer
    folder for the Tokens page.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        opener: Callable[[storage.Location], Any] | None = None,
        tokenizer: str | os.PathLike[str] | None = None,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.root = storage.location(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a folder of runs")
        self._opener = opener
        self.tokenizer_path = Path(tokenizer) if tokenizer else None
        self.stall_seconds = stall_seconds
        self._lock = threading.Lock()
        self._paths: dict[str, storage.Location] = {}
        self._sorted: list[str] = []
        self._scanned_at = 0.0
        self.walks = 0
        """How many times the folder was walked (discovery), for tests and benchmarks."""
        self._states: dict[str, RunState] = {}
        self.decoder = TokenDecoder(self.tokenizer_path)
        self._run_decoders: dict[Path, TokenDecoder] = {}
        self._warm_queue: list[str] = []
        self._warm_thread: threading.Thread | None = None

    def decoder_for(self, run_id: str) -> TokenDecoder:
        """The tokenizer given with ``--tokenizer``, else the run's own ``tokenizer/`` folder, else ids."""
        if self.tokenizer_path is not None:
            return self.decoder
        own = self.state(run_id).run.tokenizer_dir
        if own is None:
            return self.decoder
        with self._lock:
            return self._run_decoders.setdefault(own, TokenDecoder(own))

    # Discovery is a directory walk: cache it so a page with ten callbacks (or a request naming hundreds of
    # unknown ids) walks at most once per RESCAN_SECONDS.
    def run_ids(self, *, max_age: float = DISCOVERY_MAX_AGE) -> list[str]:
        """Sorted ids of the runs under the served folder (discovery at most ``max_age`` seconds old, and never
        repeated within :data:`RESCAN_SECONDS`)."""
        with self._lock:
            age = time.monotonic() - self._scanned_at
            if age > max(max_age, RESCAN_SECONDS) or not self._scanned_at:
                self._paths = discover(self.root)
                self._sorted = sorted(self._paths)
                self._scanned_at = time.monotonic()
                self.walks += 1
            return list(self._sorted)

    def resolve(self, run_id: str) -> storage.Location:
        """The directory of ``run_id``; raises :class:`UnknownRun` unless it is a run under the root.

        An id not found re-walks the folder (a run may have been created since), at most once per
        :data:`RESCAN_SECONDS` however many unknown ids arrive.
        """
        check_run_id(run_id)
        if run_id not in self._paths or not self._scanned_at:
            self.run_ids(max_age=0.0)
        path = self._paths.get(run_id)
        if path is None:
            raise UnknownRun(f"no run {run_id!r} under {self.root}")
        real = path.resolve()
        if real != self.root and self.root not in real.parents:
            raise UnknownRun(f"run {run_id!r} resolves outside {self.root}")
        return real

    def state(self, run_id: str) -> RunState:
        """The cached :class:`RunState` of a run (opened on first use)."""
        path = self.resolve(run_id)
        with self._lock:
            st = self._states.get(run_id)
            if st is None:
                st = RunState(run_id, path, opener=self._opener, stall_seconds=self.stall_seconds)
                self._states[run_id] = st
            return st

    def warm(self, run_ids: Iterable[str]) -> None:
        """Open these runs and finalize their token counts in one background thread, in order (a page that
        lists hundreds of runs shows the ones ready and fills in the others on its next refresh)."""
        with self._lock:
            for rid in run_ids:
                if rid not in self._warm_queue:
                    self._warm_queue.append(rid)
            if self._warm_thread is not None and self._warm_thread.is_alive():
                return
            self._warm_thread = threading.Thread(target=self._warm_work, name="rldiag-warm", daemon=True)
            self._warm_thread.start()

    def _warm_work(self) -> None:
        while True:
            with self._lock:
                if not self._warm_queue:
                    self._warm_thread = None
                    return
                rid = self._warm_queue.pop(0)
            try:
                self.state(rid).metrics(ALWAYS)
            except Exception:  # an unreadable run is shown with its error when a page asks for it
                continue

    def valid_ids(self, run_ids: Iterable[str] | str | None, *, limit: int = security.MAX_RUN_IDS) -> list[str]:
        """The ids among ``run_ids`` that resolve, in order, without duplicates (others are dropped).

        Bounded: at most ``limit`` ids are returned and at most :data:`app.security.MAX_ID_CHECKS` are looked at.
        """
        if run_ids is None:
            return []
        if isinstance(run_ids, str):
            run_ids = [run_ids]
        out: list[str] = []
        for n, rid in enumerate(run_ids):
            if n >= security.MAX_ID_CHECKS or len(out) >= limit:
                break
            try:
                self.resolve(rid)
            except UnknownRun:
                continue
            if rid not in out:
                out.append(rid)
        return out


# --- one run ---------------------------------------------------------------------------------------
def _open(path: storage.Location) -> Any:
    import rldiag

    return rldiag.open_run(path)


@dataclass
class RunState:
    """A run opened once, with its step metrics cached and updated incrementally."""

    run_id: str
    path: storage.Location
    opener: Callable[[storage.Location], Any] | None = None
    stall_seconds: float = STALL_SECONDS
    _run: Run | None = None
    _metrics: pl.DataFrame | None = None
    _names: set[str] = field(default_factory=set)
    _complete: bool = False
    _last_step_seen_at: float = field(default_factory=time.time)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _cache: dict[Any, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    """Page-level memos that outlive a data version (the Runs page's row of a finished run)."""
    version: int = 0
    """Bumped whenever new steps are read, so derived caches (heatmaps, buckets) know they are stale."""

    def manifest(self) -> dict[str, Any]:
        """The run's manifest (from the opened run, or read alone without opening it; {} when unreadable)."""
        with self._lock:
            if self._run is not None:
                return dict(self._run.manifest)
            if "manifest" not in self._cache:
                try:
                    self._cache["manifest"] = runformat.read_manifest(self.path)
                except (OSError, ValueError):
                    self._cache["manifest"] = {}
            return cast(dict[str, Any], self._cache["manifest"])

    @property
    def run(self) -> Run:
        with self._lock:
            if self._run is None:
                self._run = (self.opener or _open)(self.path)
            return self._run

    def metrics(self, names: Iterable[str] | None = None) -> pl.DataFrame:
        """Step metrics of every step read so far (``step`` + one Float64 column per metric), sorted.

        ``names``: the metrics the caller needs; only those (and ``tokens/count``) are finalized the first
        time, the others when a later caller asks for them (a 100,000-step run's Hill index and quantiles cost
        seconds that the Overview does not need). Without ``names``, every metric. The frame may hold more
        columns than asked for.
        """
        from rldiag.metrics.registry import REGISTRY

        asked = None if names is None else list(dict.fromkeys(names))
        wanted = None if asked is None else [n for n in asked if n in REGISTRY]
        with self._lock:
            if asked is not None and len(wanted or []) < len(asked) and not self._complete:
                # a name outside the registry (a scalar the run logged itself, say): only the full computation
                # knows which columns the run has
                known = set() if self._metrics is None else set(self._metrics.columns)
                if any(n not in REGISTRY and n not in known for n in asked):
                    wanted = None
            if self._metrics is None:
                if wanted is None:
                    frame = self.run.step_metrics()
                else:
                    frame = self.run.step_metrics(metrics=list(dict.fromkeys([*ALWAYS, *wanted])))
                self._metrics = frame.sort(schema.STEP)
                self._names = set(self._metrics.columns) - {schema.STEP}
                self._complete = wanted is None
                self._last_step_seen_at = self.run.newest_data_time() or time.time()
                return self._metrics
            if self._complete:
                return self._metrics
            # the same files as the cached columns (only update() reads new ones): the same steps
            if wanted is None:  # everything, the columns outside the registry included
                full = self.run.step_metrics()
                extra = full.select(schema.STEP, *[c for c in full.columns if c not in self._metrics.columns])
                self._metrics = self._metrics.join(extra.sort(schema.STEP), on=schema.STEP, how="left")
                self._names = set(self._metrics.columns) - {schema.STEP}
                self._complete = True
                return self._metrics
            missing = [n for n in wanted if n not in self._names]
            if missing:
                extra = self.run.step_metrics(metrics=missing).sort(schema.STEP)
                self._metrics = self._metrics.join(extra, on=schema.STEP, how="left")
                self._names |= set(missing)
            return self._metrics

    @property
    def loaded(self) -> bool:
        """Whether the run is open and its step metrics are cached (a summary of it costs no file read)."""
        return self._metrics is not None

    def update(self) -> pl.DataFrame:
        """Read files that appeared since the last call; returns the metric rows of the new steps only (the
        columns computed so far)."""
        with self._lock:
            current = self.metrics(ALWAYS) if self._metrics is None else self._metrics
            new_files = self.run.refresh()
            # A step published in parts (ranks, micro-batches in a later segment) grows: recompute every step
            # a new file holds, not only the unseen ones, so the charts show its full numbers.
            touched = set(self.run.file_steps(new_files))
            steps_np = np.asarray(self.run.compact_table().column(schema.STEP).to_numpy(), dtype=np.int64)
            known = current[schema.STEP].to_numpy()
            if known.size and not np.isin(known, steps_np).all():
                # steps it showed are gone (the run was deleted and written again): start over, a full redraw
                self._metrics = None
                self.version += 1
                self._cache.clear()
                return self.metrics(ALWAYS)
            if len(steps_np) != len(known) or not np.array_equal(steps_np, known):  # O(n) compare, no sets
                touched |= set(steps_np[~np.isin(steps_np, known)].tolist())
            if not touched:
                return current.clear()
            names = sorted(self._names)
            fresh = self.run.step_metrics(steps=sorted(touched), metrics=names).sort(schema.STEP)
            kept = current.filter(~pl.col(schema.STEP).is_in(fresh[schema.STEP].to_list()))
            self._metrics = pl.concat([kept, fresh.select(current.columns)], how="vertical_relaxed").sort(schema.STEP)
            self._last_step_seen_at = time.time()
            self.version += 1
            self._cache.clear()
            return fresh.select(current.columns)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per data version (cleared when new steps land)."""
        with self._lock:
            if key not in self._cache:
                if len(self._cache) >= MAX_CACHED_VIEWS:  # zooms add entries: keep the memory bounded
                    self._cache.clear()
                self._cache[key] = build()
            return self._cache[key]

    # -- status ------------------------------------------------------------------------------------
    def is_closed(self) -> bool:
        """True when the run ended: every rank's latest writer closed it or its process is gone from this
        machine (:func:`rldiag.runformat.run_closed` with ``count_gone``)."""
        return bool(self.run.is_closed(count_gone=True))

    def status(self, now: float | None = None) -> str:
        """``"finished"``, ``"live"`` or ``"stalled"`` (open, no new step for ``stall_seconds``)."""
        closed = self.is_closed()
        newest = None if closed else self.run.newest_data_time()
        last = max(self._last_step_seen_at, newest or 0.0)
        return runformat.run_status(
            closed=closed,
            last_data_time=last,
            now=time.time() if now is None else now,
            stall_seconds=self.stall_seconds,
        )

    # -- alerts ------------------------------------------------------------------------------------
    def alerts(self, *, replaced: bool = False) -> list[dict[str, Any]]:
        """Events of ``alerts.jsonl`` in file order (re-read only when the file changed), without those a restart
        replaced unless ``replaced`` (:meth:`rldiag.analysis.io.Run.alerts`)."""
        with self._lock:
            return self.run.alerts(replaced=replaced)

    # -- tokens ------------------------------------------------------------------------------------
    def tokens_at(self, step: int) -> pl.DataFrame:
        """All token rows of one step (the recorder may have sampled sequences; see the run config)."""
        return self.run.tokens().filter(pl.col(schema.STEP) == step).collect()

    def analysis_steps(self, limit: int | None = None, x_range: tuple[float, float] | None = None) -> list[int]:
        """Steps that token-row analyses (lens, buckets) use: all of them, or evenly spaced ones (first and
        last included) on long runs, so a page never scans tens of millions of rows.

        Default ``limit``: as many steps as fit :data:`TOKEN_ROW_BUDGET` rows, between
        :data:`MIN_TOKEN_STEPS` and :data:`MAX_TOKEN_STEPS`. ``x_range`` (a zoom) chooses among the steps in
        that range only, so zooming in shows more of them, down to every step.
        """
        frame = self.metrics(ALWAYS)
        steps = frame[schema.STEP].to_list()
        if x_range is not None:
            lo, hi = sorted(x_range)
            steps = [s for s in steps if lo <= s <= hi]
        if limit is None:
            mean = frame["tokens/count"].cast(pl.Float64).mean() if "tokens/count" in frame.columns else None
            per_step = float(mean) if isinstance(mean, (int, float)) and mean == mean else 0.0
            fit = int(TOKEN_ROW_BUDGET // per_step) if per_step > 0 else MAX_TOKEN_STEPS
            limit = min(max(fit, MIN_TOKEN_STEPS), MAX_TOKEN_STEPS)
        if len(steps) <= limit:
            return steps
        idx = np.unique(np.linspace(0, len(steps) - 1, limit).round().astype(int))
        return [steps[i] for i in idx]

    # -- derived views (cached per data version through ``cached``) ---------------------------------
    def lr_histogram(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, bin centres of |log-ratio|, counts[bins, steps]) from the stored ``h_lr`` histograms."""
        from rldiag.metrics import aggregate
        from rldiag.stats import hist

        with self._lock:
            table = self.run.stats_table()
        merged = aggregate.merge(table, by=(schema.STEP,), stats={"h_lr"})
        if merged.n_groups == 0:
            return np.zeros(0), np.zeros(0), np.zeros((0, 0))
        mag = hist.fold(np.asarray(merged.stats["h_lr"], dtype=np.float64))
        return merged.keys[schema.STEP], hist.representative(hist.N_MAG), mag.T

    def rank_metrics(self, metric: str) -> pl.DataFrame:
        """One metric per (step, rank): columns ``step``, ``rank``, ``metric`` (cached per data version)."""

        def build() -> pl.DataFrame:
            with self._lock:
                frame = self.run.step_metrics(metrics=[metric], by_rank=True)
            return frame.select(schema.STEP, "rank", metric).sort(schema.STEP, "rank")

        return cast(pl.DataFrame, self.cached(("rank_metrics", metric), build))

    def lens(self) -> pl.DataFrame:
        """The objective lens on :meth:`analysis_steps`."""
        return self.run.lens(steps=self.analysis_steps())

    def bucket_metrics(self, by: str, x_range: tuple[float, float] | None = None) -> pl.DataFrame:
        """``run.bucket_metrics(by=...)`` (deciles for positions) on :meth:`analysis_steps` (of the zoomed range),
        cached per data version and step selection."""
        steps = self.analysis_steps(x_range=x_range)
        key = ("buckets", by, len(steps), steps[0] if steps else None, steps[-1] if steps else None)
        return cast(pl.DataFrame, self.cached(key, lambda: self.run.bucket_metrics(by=by, buckets=10, steps=steps)))


ALERT_FIELDS = ("time", "rule", "severity", "state", "step", "start_step", "metric", "value", "threshold", "summary")


MAX_ALERT_TEXT = 2000
"""Longest rule name, summary or other text field of an alert event that is shown (longer ones are cut)."""
_MAX_TIMESTAMP = 253402300799.0  # 9999-12-31T23:59:59Z: the last second a datetime can show


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return (v if isinstance(v, str) else str(v))[:MAX_ALERT_TEXT]


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int):
        return v if abs(v) < 2**63 else None
    return v


def _step_of(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 else None


def normalize_alert(event: dict[str, Any]) -> dict[str, Any]:
    """One ``alerts.jsonl`` event (``Notification.to_json``) with the fields the Alerts page shows; its
    ``event`` (firing, repeat, resolved) becomes ``state``, missing fields are None.

    The file is data from outside: a field of the wrong type or out of range (``"time": 1e20``, a list as the
    rule, a step of 2**70) becomes None (or text) instead of failing the page.
    """
    t = _number(event.get("time"))
    if t is not None and not (math.isfinite(t) and 0 <= t <= _MAX_TIMESTAMP):
        t = None
    return {
        "time": t,
        "rule": _text(event.get("rule")),
        "severity": _text(event.get("severity")),
        "state": _text(event.get("event")),
        "start_step": _step_of(event.get("start_step")),
        "step": _step_of(event.get("step")),
        "metric": _text(event.get("metric")),
        "value": _number(event.get("value")),
        "threshold": _number(event.get("threshold")),
        "summary": _text(event.get("summary")),
    }


def firing_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized events whose state is ``firing`` (the steps the Overview marks)."""
    out = []
    for ev in events:
        n = normalize_alert(ev)
        if str(n["state"]).lower() == "firing":
            out.append(n)
    return out


def alert_states(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest normalized event of each rule, i.e. its current state (a ``repeat`` is ``firing``)."""
    latest: dict[str, dict[str, Any]] = {}
    for ev in events:
        n = normalize_alert(ev)
        if n["rule"] is not None:
            if str(n["state"]).lower() == "repeat":
                n = {**n, "state": "firing"}
            latest[str(n["rule"])] = n
    return latest


# --- token decoding --------------------------------------------------------------------------------
class TokenDecoder:
    """Token id -> text, with a local tokenizer folder (transformers) or as ``#id`` without one.

    Loading never downloads: ``local_files_only=True``. A tokenizer that fails to load is reported once
    through :attr:`error` and the ids are shown instead.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.error: str | None = None
        self._tok: Any = None
        self._loaded = False
        self._memo: dict[int, str] = {}
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        with self._lock:
            if not self._loaded:
                self._loaded = True
                if self.path is not None:
                    try:
                        from transformers import AutoTokenizer

                        self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
                    except Exception as exc:  # any loader failure: fall back to ids, say why
                        self.error = f"could not load tokenizer from {self.path}: {exc}"
            return self._tok

    def decode(self, ids: Iterable[int | None]) -> list[str]:
        """One string per id; ``None`` (no ``token_id`` recorded) becomes ``"?"``."""
        tok = self._tokenizer()
        out = []
        for i in ids:
            if i is None:
                out.append("?")
            elif tok is None:
                out.append(f"#{int(i)}")
            else:
                key = int(i)
                text = self._memo.get(key)
                if text is None:
                    text = self._memo[key] = _decode_one(tok, key)
                out.append(text)
        return out


def _decode_one(tok: Any, token_id: int) -> str:
    try:
        return str(tok.decode([token_id]))
    except Exception:  # an id outside the vocabulary: show it rather than fail the page
        return f"#{token_id}"


# --- the catalog of the running app -----------------------------------------------------------------
_LAST: list[Catalog] = []


def set_default(cat: Catalog) -> None:
    """Make ``cat`` the catalog used outside a request (the last app created wins)."""
    _LAST[:] = [cat]


def catalog() -> Catalog:
    """The catalog of the app serving the current request (or the last one configured)."""
    try:
        import flask

        if flask.has_app_context():
            cat = flask.current_app.extensions.get("rldiag")
            if cat is not None:
                return cat
    except ImportError:  # pragma: no cover - flask comes with dash
        pass
    if not _LAST:
        raise RuntimeError("no rldiag catalog configured: create the app with app.app.create_app(path)")
    return _LAST[0]


def to_numpy(frame: pl.DataFrame, column: str) -> np.ndarray:
    """A Float64 numpy view of a column (nulls -> NaN); a missing column is all NaN."""
    if column not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame[column].cast(pl.Float64).fill_null(float("nan")).to_numpy()
