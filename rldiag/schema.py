"""Column names, dtypes and the schema version of an rldiag run.

This is the only module that spells a token-row column name; everything else imports the constants.
The meanings are those of docs/run-format.md (token columns).
"""

from __future__ import annotations

from typing import Final

import pyarrow as pa

# The run format's version and file names live in rldiag.runformat (their one home); re-exported here
# because they have always been importable from this module.
from rldiag.runformat import (  # noqa: F401 - re-exported
    ALERTS_FILE,
    MANIFEST_NAME,
    PARQUET_META_KEY,
    SCHEMA_VERSION,
    STATS_DIR,
    TMP_SUFFIX,
    TOKENIZER_DIR,
    TOKENS_DIR,
    WRITERS_DIR,
)

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
ROUTE_AGREE: Final = "route_agree"
COV: Final = "cov"

KEY_COLUMNS: Final[tuple[str, ...]] = (STEP, RANK, MICRO, SEQ, POS)
REQUIRED_VALUE_COLUMNS: Final[tuple[str, ...]] = (LOGP, OLD_LOGP, ADV)
OPTIONAL_COLUMNS: Final[tuple[str, ...]] = (
    GROUP,
    TURN,
    STAGE,
    ROLLOUT_LOGP,
    REF_LOGP,
    TEACHER_LOGP,
    BASE_LOGP,
    ENTROPY,
    TOKEN_ID,
    REWARD,
    VERSION,
    ROUTE_AGREE,
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
    ROUTE_AGREE: pa.float32(),
    COV: pa.float32(),
}
"""Arrow dtype of every token-row column (docs/run-format.md, token columns)."""

LATER_TOKEN_COLUMNS: Final[frozenset[str]] = frozenset({ROUTE_AGREE})
"""Token columns added after the first run format: a token file of an older rldiag lacks them and reads them as
null (not recorded). A column added later is listed here, so runs written before it keep opening."""

TOKEN_COLUMN_ORDER: Final[tuple[str, ...]] = tuple(TOKEN_DTYPES)
