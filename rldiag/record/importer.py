"""Build an rldiag run from token rows that came without statistics (Parquet or CSV from elsewhere).

Kept for its import path: the importer lives in :mod:`rldiag.importers.tokens` with the other trainers'.
"""

from __future__ import annotations

from rldiag.importers.tokens import import_token_file, import_tokens, read_token_file

__all__ = ["import_token_file", "import_tokens", "read_token_file"]
