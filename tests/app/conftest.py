"""Fixtures of the dashboard tests: recorded runs, a tokenizer folder, Chromium options for dash_duo."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synth import record_run  # noqa: E402

SCREENSHOTS = Path(os.environ.get("RLDIAG_SCREENSHOTS", Path(tempfile.gettempdir()) / "rldiag-screenshots"))
"""Where the browser tests save a full-page PNG of every page (outside the repository by default)."""
HOSTILE = "<script>alert(1)</script>"
"""A token string that must be shown as text, never run."""


def _spread_dash_ports() -> None:
    """dash_duo numbers its servers from a class-level counter (58050, 58051, ...) in every process, so two
    pytest-xdist workers would collide on 58050: give each worker its own range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    try:
        from dash.testing.application_runners import BaseDashRunner
    except ImportError:  # dash[testing] absent: the browser tests are skipped anyway
        return
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    BaseDashRunner._next_port = 58050 + 200 * index


_spread_dash_ports()


def pytest_setup_options():
    """Chromium flags for dash_duo: headless-safe on a container without a GPU or a large /dev/shm."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    for flag in (
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1100",
        "--force-device-scale-factor=1",
        "--lang=en-US",
    ):
        options.add_argument(flag)
    if os.path.exists("/usr/bin/chromium") and not os.environ.get("DASH_TEST_CHROMEPATH"):
        options.binary_location = "/usr/bin/chromium"
    return options


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served folder with two finished runs: a full one (alerts on) and a nested one without optional inputs."""
    root = tmp_path_factory.mktemp("runs")
    record_run(root / "grpo_full", steps=12, alerts=True)
    record_run(root / "sweep" / "minimal", steps=10, full=False, seed=5)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local tokenizer whose vocabulary holds the hostile string (id 7) and plain words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "the", " cat", " sat", "\n", " ", HOSTILE] + [f"w{i}" for i in range(8, 64)]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture
def make_app(runs_root: Path):
    """``make_app(path=None, **kw)``: a dashboard app (default: the session's runs)."""
    from app.app import create_app

    def make(path: Path | None = None, **kw):
        return create_app(path or runs_root, **kw)

    return make
