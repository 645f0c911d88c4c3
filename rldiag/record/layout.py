"""Run directory layout: kept importable for code written against it; the run format lives in
:mod:`rldiag.runformat` (manifest, writer files, segment names, atomic publication)."""

from __future__ import annotations

from rldiag.runformat import (  # noqa: F401 - re-exported
    atomic_write_bytes,
    create_run_dir,
    read_manifest,
    segment_name,
    write_writer_file,
    writer_id,
)

__all__ = ["atomic_write_bytes", "create_run_dir", "read_manifest", "segment_name", "write_writer_file", "writer_id"]
