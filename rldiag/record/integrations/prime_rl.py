"""Import prime-rl token exports into an rldiag run.

Kept for its import path: the importer lives in :mod:`rldiag.importers.prime_rl` with the other trainers'
(docs/importers.md and docs/integrations.md describe the mapping).
"""

from __future__ import annotations

from rldiag.importers.prime_rl import (
    REQUIRED_KEYS,
    TOKEN_KEYS,
    PrimeRLImportError,
    import_prime_rl,
)

__all__ = ["REQUIRED_KEYS", "TOKEN_KEYS", "PrimeRLImportError", "import_prime_rl"]
