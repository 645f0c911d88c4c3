"""The dashboard works from an installed wheel, not only from the source tree."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_app_runs_from_the_installed_wheel(tmp_path: Path, runs_root: Path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    wheel = next(wheels.glob("rldiag-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # the test's own packages (dash, polars...) come from this interpreter's site folders, listed in a .pth
    # file: `system_site_packages` would give the *base* interpreter's, which lack them when the suite runs
    # inside a virtual environment. Paths from a .pth file come after the new venv's own site-packages (so the
    # installed wheel wins), and .pth files inside them are not run (so an editable install of the source tree
    # cannot shadow the wheel).
    site_dir = next((env_dir / "lib").glob("python*/site-packages"))
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site_dir / "outer-site.pth").write_text("\n".join(outer) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    script = textwrap.dedent(f"""
        import app, dash
        from app.app import create_app
        assert "{env_dir}" in app.__file__, app.__file__
        a = create_app({str(runs_root)!r})
        c = a.server.test_client()
        assert c.get("/").status_code == 200
        css = c.get("/assets/style.css")
        assert css.status_code == 200 and b".nav-link" in css.data
        paths = {{p["path"] for p in dash.page_registry.values()}}
        assert {{"/", "/overview", "/tokens", "/alerts"}} <= paths, paths
        from rldiag.cli import build_parser
        assert "dashboard" in build_parser().format_help()
        print("ok")
    """)
    # -I: isolated mode, so neither the source tree (cwd) nor PYTHONPATH can supply `app`
    out = subprocess.run([str(py), "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
