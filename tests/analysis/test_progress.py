import io

from rldiag.analysis.progress import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only() -> None:
    tty, pipe = _Tty(), io.StringIO()
    assert list(progress(range(5), 5, "scan", stream=tty, min_seconds=0)) == list(range(5))
    assert list(progress(range(5), 5, "scan", stream=pipe, min_seconds=0)) == list(range(5))
    assert "scan [" in tty.getvalue() and tty.getvalue().rstrip().endswith("5/5")
    assert pipe.getvalue() == ""
