from pathlib import Path

from rldiag.metrics.docs import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_metrics_doc_is_generated_from_the_registry() -> None:
    assert DOC.read_text() == render(), (
        "docs/metrics.md is stale: run `python -m rldiag.metrics.docs > docs/metrics.md`"
    )


def test_metrics_doc_keeps_derived_labels_and_alert_defaults() -> None:
    text = render()
    assert "| `ratio/m2` | mean((r-1)^2), the chi-square divergence estimate **derived**" in text
    assert "`seq/minprefix_ratio_p5`" in text and text.count("**derived**") >= 3
    assert "critical `nonfinite`" in text


def test_docs_count_the_registry_s_metrics() -> None:
    from rldiag.metrics.registry import REGISTRY

    root = DOC.parents[1]
    assert f"{len(REGISTRY)} metrics, each exact" in (root / "README.md").read_text()
    assert f"the registry's {len(REGISTRY)} metrics" in (root / "docs" / "dashboard.md").read_text()
