"""A progress bar for long scans: drawn on stderr when it is a terminal, silent otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], total: int, label: str, *, stream: TextIO | None = None, min_seconds: float = 1.0
) -> Iterator[T]:
    """Yield ``items``; after ``min_seconds`` draw ``label [#####     ] i/total`` on a terminal."""
    out = sys.stderr if stream is None else stream
    tty = bool(getattr(out, "isatty", lambda: False)())
    start = time.monotonic()
    drawn = False
    for i, item in enumerate(items, 1):
        yield item
        if tty and total > 1 and time.monotonic() - start >= min_seconds:
            filled = int(30 * i / total)
            out.write(f"\r{label} [{'#' * filled}{' ' * (30 - filled)}] {i}/{total}")
            out.flush()
            drawn = True
    if drawn:
        out.write("\n")
        out.flush()
