"""A built wheel carries configs/, convert/ and ops/ and works from outside the repository."""
import site
import subprocess
import sys
from pathlib import Path
import textwrap

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_installs_and_creates_a_model(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO_ROOT)], check=True, timeout=600)
    wheel = next(wheels.glob("relzoo-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # Reuse this environment's packages (torch, ...) without its editable RelZoo: a plain path
    # line in a .pth adds the folder to sys.path but, unlike site.addsitedir, runs none of its .pth files.
    scratch_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    Path(scratch_site, "test_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    script = textwrap.dedent(f"""
        import zoo, zoo.paths
        assert zoo.__file__.startswith({str(venv)!r}), zoo.__file__
        root = zoo.paths.data_root()
        assert root.name == "_data" and str(root).startswith({str(venv)!r}), root
        for d in ("configs", "convert", "ops"):
            assert any((root / d).iterdir()), d
        names = zoo.list_models()
        model = zoo.create_model("rpa_cifar_toy" if "rpa_cifar_toy" in names else names[0])
        print("OK", len(names), type(model).__name__)
    """)
    result = subprocess.run([str(py), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")
