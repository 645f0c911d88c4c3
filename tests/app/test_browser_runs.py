"""The per-run views, the Ranks page and the Runs page's groups in a real Chromium (dash_duo), headless.

Run with ``pytest tests/app/test_browser_runs.py -m browser --headless``; screenshots land beside the other
browser tests' (``$RLDIAG_SCREENSHOTS``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from synth import record_run
from test_browser import _screenshot, _settle, _severe
from test_ranks import BAD_RANK, record_ranks

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FIGURES_OF = """
const type = arguments[0];
return Array.from(document.querySelectorAll('.js-plotly-plot')).filter(p => {
    const host = p.closest('[id]');
    return host && host.id.includes(type);
}).map(p => ({id: p.closest('[id]').id, title: ((p.layout || {}).title || {}).text || '',
              traces: (p.data || []).map(t => t.type)}));
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser-runs")
    record_run(root / "grpo_full", steps=12)
    record_run(root / "other", steps=10, seed=4)
    record_ranks(root / "four_ranks", steps=20)
    for seed in (1, 2):
        run = root / f"lr1_seed{seed}"
        record_run(run, steps=8, seed=seed)
        m = json.loads((run / "manifest.json").read_text())
        m["tags"] = {"lr": "1e-6", "seed": seed}
        (run / "manifest.json").write_text(json.dumps(m))
    return root


def _wait_figures(dash_duo, graph_type: str, n: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.time() + timeout
    found: list[dict] = []
    while time.time() < deadline:
        found = dash_duo.driver.execute_script(FIGURES_OF, graph_type)
        if len(found) >= n and all(f["traces"] for f in found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"{graph_type}: {found}")


@pytest.mark.parametrize(
    "path, graph_type",
    [
        ("/positions?run=grpo_full&run=other", "pos-buckets-graph"),
        ("/ratios?run=grpo_full&run=other", "ratio-runs-graph"),
        ("/clipping?run=grpo_full&run=other", "lens-runs-lines"),
    ],
)
def test_every_selected_run_gets_its_own_figure(dash_duo, folder: Path, path: str, graph_type: str):
    from app.app import create_app

    dash_duo.start_server(create_app(folder, poll_seconds=30))
    dash_duo.driver.get(dash_duo.server_url + path)
    found = _wait_figures(dash_duo, graph_type, 2)
    titles = " ".join(f["title"] for f in found)
    assert "grpo_full" in titles and "other" in titles
    _settle(dash_duo)
    _screenshot(dash_duo, "per-run-" + path.strip("/").split("?")[0])
    assert _severe(dash_duo.get_logs() or []) == []


def test_ranks_page_names_the_bad_rank(dash_duo, folder: Path):
    from app.app import create_app

    dash_duo.start_server(create_app(folder, poll_seconds=30))
    dash_duo.driver.get(dash_duo.server_url + "/ranks?run=four_ranks")
    (fig,) = _wait_figures(dash_duo, "ranks-graph", 1)
    assert fig["traces"].count("scatter") == 4 and "heatmap" in fig["traces"]
    assert f"rank {BAD_RANK} deviates most" in fig["title"]
    _settle(dash_duo)
    _screenshot(dash_duo, "ranks")
    assert _severe(dash_duo.get_logs() or []) == []


def test_runs_page_groups_seeds_into_a_band(dash_duo, folder: Path):
    from app.app import create_app

    dash_duo.start_server(create_app(folder, poll_seconds=30))
    dash_duo.driver.get(dash_duo.server_url + "/")
    dash_duo.wait_for_element("#runs-table table", timeout=30)
    dash_duo.wait_for_contains_text("#runs-table", "tags.seed", timeout=30)
    dash_duo.find_element("#runs-group-by").click()
    options = dash_duo.driver.find_elements(By.XPATH, "//*[text()='name without seed']")
    options[-1].click()
    dash_duo.wait_for_contains_text("#runs-table", "lr1 · 2 run(s)", timeout=30)
    dash_duo.wait_for_contains_text("#runs-band-note", "group(s) of 5 run(s)", timeout=30)
    legend = dash_duo.driver.execute_script(
        "return Array.from(document.querySelectorAll('#runs-band .legendtext')).map(e => e.textContent);"
    )
    assert "lr1 (2 runs)" in legend
    _screenshot(dash_duo, "runs-grouped")
    assert _severe(dash_duo.get_logs() or []) == []
