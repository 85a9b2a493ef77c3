"""README's pictures come from scripts/readme_figures.py (one per family, drawn from the minis): the committed
ones exist and are pictures, and the script draws them (here for one family, to stay fast)."""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, picture, subprocess_env

pytest.importorskip("matplotlib")

FAMILIES = ("irpe", "rga", "rsa", "rpa", "sasa")


@pytest.mark.parametrize("family", FAMILIES)
def test_committed_figure_is_apicture(family):
    picture(REPO_ROOT / "docs" / "figures" / f"{family}.png")


def test_script_draws_a_family(tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "readme_figures.py"), "--families", "rga",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    picture(tmp_path / "rga.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rga.png"]
