"""Column names, dtypes and the schema version of an rldiag run.

This is the only module that spells a token-row column name; everything else imports the constants.
The meanings are those of ``metrics-spec.md`` section 1.
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

SCHEMA_VERSION: Final[int] = 1
"""Version of the on-disk run format. Readers refuse runs with a newer version."""

# --- keys -------------------------------------------------------------------------------------------
STEP: Final = "step"
RANK: Final = "rank"
MICRO: Final = "micro"
SEQ: Final = "seq"
GROUP: Final = "group"
POS: Final = "pos"
TURN: Final = "turn"
STAGE: Final = "stage"
# --- per-token values -------------------------------------------------------------------------------
LOGP: Final = "logp"
OLD_LOGP: Final = "old_logp"
ROLLOUT_LOGP: Final = "rollout_logp"
REF_LOGP: Final = "ref_logp"
TEACHER_LOGP: Final = "teacher_logp"
BASE_LOGP: Final = "base_logp"
ADV: Final = "adv"
ENTROPY: Final = "entropy"
TOKEN_ID: Final = "token_id"
REWARD: Final = "reward"
VERSION: Final = "version"
COV: Final = "cov"

KEY_COLUMNS: Final[tuple[str, ...]] = (STEP, RANK, MICRO, SEQ, POS)
REQUIRED_VALUE_COLUMNS: Final[tuple[str, ...]] = (LOGP, OLD_LOGP, ADV)
OPTIONAL_COLUMNS: Final[tuple[str, ...]] = (
    GROUP, TURN, STAGE, ROLLOUT_LOGP, REF_LOGP, TEACHER_LOGP, BASE_LOGP,
    ENTROPY, TOKEN_ID, REWARD, VERSION,
)

TOKEN_DTYPES: Final[dict[str, pa.DataType]] = {
    STEP: pa.int64(),
    RANK: pa.int32(),
    MICRO: pa.int32(),
    SEQ: pa.int64(),
    GROUP: pa.int64(),
    POS: pa.int32(),
    TURN: pa.int32(),
    STAGE: pa.int32(),
    LOGP: pa.float32(),
    OLD_LOGP: pa.float32(),
    ROLLOUT_LOGP: pa.float32(),
    REF_LOGP: pa.float32(),
    TEACHER_LOGP: pa.float32(),
    BASE_LOGP: pa.float32(),
    ADV: pa.float32(),
    ENTROPY: pa.float32(),
    TOKEN_ID: pa.int32(),
    REWARD: pa.float32(),
    VERSION: pa.int64(),
    COV: pa.float32(),
}
"""Arrow dtype of every token-row column (metrics-spec section 1)."""

TOKEN_COLUMN_ORDER: Final[tuple[str, ...]] = tuple(TOKEN_DTYPES)

# --- run directory layout ---------------------------------------------------------------------------
MANIFEST_NAME: Final = "manifest.json"
"""Run-level manifest (first writer creates it; later writers append resume points)."""
WRITERS_DIR: Final = "writers"
"""One JSON file per writer process: ``writers/<rank>-<host>-<pid>-<start>.json``."""
TOKENS_DIR: Final = "tokens"
STATS_DIR: Final = "stats"
ALERTS_FILE: Final = "alerts.jsonl"
TOKENIZER_DIR: Final = "tokenizer"
"""Optional: a transformers tokenizer saved in the run (``tokenizer.save_pretrained``); the dashboard decodes
token ids with it when no ``--tokenizer`` is given."""
TMP_SUFFIX: Final = ".tmp"
"""Files are written under this suffix and renamed to ``.parquet`` when closed."""

PARQUET_META_KEY: Final = b"rldiag"
"""Key of the JSON blob (schema version, rldiag version, config) in every Parquet file's metadata."""
