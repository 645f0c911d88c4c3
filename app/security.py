"""Server-level hardening of the dashboard: bounded requests, a quiet request log, a safe debug mode, and
text from runs shown with its invisible characters made visible.

:func:`harden` is called once by :func:`app.app.create_app`. What it bounds, and why (docs/security.md):

* the request body (Flask's ``MAX_CONTENT_LENGTH``): a Dash callback carries a few kB of ids and values, so
  anything over :data:`MAX_BODY_BYTES` is refused with 413 before it is read;
* the URL (path and query) to :data:`MAX_URL_BYTES` (414);
* the run ids one request may name (:data:`MAX_RUN_IDS`, applied by :meth:`app.data.Catalog.valid_ids`), and
  the rows a page may ask for (:func:`clamp`, used by the Tokens page's ``k``).

Werkzeug's request log (one line per request: 50 lines a minute per open page while polling) is off unless
``rldiag dashboard --verbose``; warnings and errors of the server still print.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from typing import Any

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (1 MiB); a callback of the busiest page sends under 100 kB."""
MAX_URL_BYTES = 8192
"""Largest request URL (path and query string) accepted."""
MAX_RUN_IDS = 16
"""Most runs one page shows at once; further ids in a request are ignored (and never resolved)."""
MAX_ID_CHECKS = 64
"""Most run ids of one request that are looked at at all (the rest are ignored unread)."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_REQUEST_LINE = re.compile(r' - - \[[^\]]*\] "')


def harden(app: Any, *, verbose: bool = False) -> None:
    """Bound every request of a Dash ``app`` and set the request log (off unless ``verbose``)."""
    import flask

    server = app.server
    server.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    def bound_url() -> Any:
        req = flask.request
        size = len(req.full_path.encode("utf-8", "surrogateescape"))
        if size > MAX_URL_BYTES:
            return flask.Response(f"request URL too long ({size} bytes; at most {MAX_URL_BYTES})\n", 414)
        length = req.content_length
        if length is not None and length > MAX_BODY_BYTES:
            return flask.Response(f"request body too large ({length} bytes; at most {MAX_BODY_BYTES})\n", 413)
        return None

    # first of all hooks: nothing else runs for a request that is refused here
    server.before_request_funcs.setdefault(None, []).insert(0, bound_url)
    request_log(verbose)


class _QuietRequests(logging.Filter):
    """Drops Werkzeug's per-request lines (``127.0.0.1 - - [date] "GET / HTTP/1.1" 200 -``), keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted is not a request line
            return True
        return _REQUEST_LINE.search(message) is None


_FILTER = _QuietRequests()


def request_log(verbose: bool) -> None:
    """Turn Werkzeug's request log on (``verbose``) or off; the server's warnings and errors always print."""
    logger = logging.getLogger("werkzeug")
    if verbose:
        logger.removeFilter(_FILTER)
    elif _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def debug_refusal(host: str, auth: object | None) -> str | None:
    """Why ``--debug`` must not run with this host and auth (None when it may).

    Dash's debug mode serves its dev tools (and Werkzeug's debugger on errors, which runs code typed into the
    page): only for one person on this machine, behind a password.
    """
    problems = []
    if host not in LOOPBACK_HOSTS:
        problems.append(f"binds {host}, not loopback (use --host 127.0.0.1)")
    if not auth:
        problems.append("has no --auth (or RLDIAG_DASHBOARD_AUTH)")
    if not problems:
        return None
    return (
        "--debug serves Dash's dev tools and the Werkzeug debugger, which run code sent from the page; refused "
        "because the server " + " and ".join(problems)
    )


def clamp(value: Any, lo: int, hi: int, default: int) -> int:
    """``value`` as an int within [lo, hi]; ``default`` when it is not a number (a request's row count)."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return min(max(n, lo), hi)


# --- text from runs --------------------------------------------------------------------------------------
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Bidirectional controls: they reorder the text around them on screen (Trojan Source, CVE-2021-42574)."""
_VISIBLE_WS = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def _escape(ch: str) -> str:
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp < 0x100 else (f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}")


def plot_text(text: str) -> str:
    """Text from a run for a plotly title, legend or hover label: plotly reads a subset of HTML there
    (``<b>``, ``<a href>``, ``<br>``), so markup is escaped, and invisible characters are made visible."""
    return html.escape(visible(str(text)), quote=False)


def visible(text: str, *, whitespace: bool = False) -> str:
    """``text`` with control, format and bidirectional characters written as escapes (``\\u202e``).

    Newline, tab and carriage return become visible marks (↵ ⇥ ␍) when ``whitespace`` is set (token text) and
    escapes otherwise (names, messages). The result is still plain text, rendered as a text node.
    """
    if text.isprintable() and not (_BIDI & set(text)):
        return text
    out = []
    for ch in text:
        if ch in _VISIBLE_WS and whitespace:
            out.append(_VISIBLE_WS[ch])
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)
