"""Run directory layout: manifest, writer files, segment names, atomic publication.

A run directory holds ``manifest.json`` (created once, never rewritten), ``writers/<writer>.json`` (one per
writer process: rank, host, pid, start time, config: together the resume points), and Parquet segments under
``stats/`` and ``tokens/`` named ``<writer>-<segment>.parquet``. Every file is written under a temporary
name in the same folder and renamed into place when closed, so a reader never sees half a file; writers never
share a file name, so ranks and restarts need no locks.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from rldiag import __version__
from rldiag.config import RecorderConfig
from rldiag.schema import MANIFEST_NAME, SCHEMA_VERSION, STATS_DIR, TMP_SUFFIX, TOKENS_DIR, WRITERS_DIR


def writer_id(rank: int, start_ns: int | None = None) -> str:
    """Unique name of a writer process: ``r<rank>-<host>-<pid>-<start>``."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
    start = time.time_ns() if start_ns is None else start_ns
    return f"r{rank:05d}-{host}-{os.getpid()}-{start:x}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_run_dir(path: Path, cfg: RecorderConfig, world_size: int, name: str | None) -> dict[str, Any]:
    """Create the run directory and its manifest if absent; return the manifest in force.

    Safe against several processes doing it at once: the manifest is linked into place, so exactly one wins.
    A directory that exists and holds something other than an rldiag run is refused.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"run directory {path} exists and is a file; choose another path")
    manifest_path = path / MANIFEST_NAME
    if path.is_dir() and not manifest_path.exists():
        foreign = [p.name for p in path.iterdir() if p.name not in (STATS_DIR, TOKENS_DIR, WRITERS_DIR)
                   and not p.name.startswith(".") and p.name not in ("alerts.jsonl", "tokenizer")]
        if foreign:
            raise ValueError(
                f"{path} is not empty and is not an rldiag run (found {', '.join(sorted(foreign)[:5])}); "
                "give the recorder an empty or new directory"
            )
    for sub in (STATS_DIR, TOKENS_DIR, WRITERS_DIR):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if not manifest_path.exists():
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "rldiag_version": __version__,
            "created": time.time(),
            "name": name or path.resolve().name,
            "world_size": world_size,
            "config": cfg.to_dict(),
        }
        tmp = path / f".{MANIFEST_NAME}.{os.getpid()}{TMP_SUFFIX}"
        tmp.write_text(json.dumps(manifest, indent=2))
        try:
            os.link(tmp, manifest_path)  # fails if another process won the race
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return read_manifest(path)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a run, validated; a clear error for a missing, corrupt or newer one."""
    manifest_path = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is not an rldiag run: {MANIFEST_NAME} is missing (record into it with rldiag.Recorder, "
            "or build one with `rldiag import`)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is corrupt ({exc}); restore it from a copy of the run") from None
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ValueError(f"{manifest_path} has no integer schema_version; it was not written by rldiag")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path} was written with run-format version {version} by rldiag {manifest.get('rldiag_version')}, "
            f"newer than this rldiag {__version__} reads (version {SCHEMA_VERSION}); upgrade rldiag"
        )
    return manifest


def write_writer_file(path: Path, wid: str, info: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path) / WRITERS_DIR / f"{wid}.json", json.dumps(info, indent=2).encode())


def segment_name(wid: str, seg: int) -> str:
    return f"{wid}-{seg:06d}.parquet"
