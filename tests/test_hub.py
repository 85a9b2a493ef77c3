"""torch.hub: every registered model is an entrypoint with a docstring, loaded from a plain checkout."""
import subprocess
import sys
import textwrap


import zoo
from conftest import REPO_ROOT


def _import_hubconf_like_torch_hub():
    """What torch.hub.list / help do after fetching a repo: import hubconf.py from the repo folder."""
    from torch.hub import _import_module

    sys.path.insert(0, str(REPO_ROOT))
    try:
        return _import_module("hubconf", str(REPO_ROOT / "hubconf.py"))
    finally:
        sys.path.remove(str(REPO_ROOT))


def test_entrypoints_are_exactly_the_registry_with_docstrings():
    hub = _import_hubconf_like_torch_hub()
    # torch.hub.list's rule: public callables of the module.
    entrypoints = sorted(f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_"))
    assert entrypoints == zoo.list_models()
    assert entrypoints, "no model registered"
    for name in entrypoints:
        doc = getattr(hub, name).__doc__
        assert doc and name in doc and "pretrained" in doc


def test_hub_load_from_a_bare_checkout_equals_create_model(tmp_path):
    """Copy the tracked tree (no install, nothing on sys.path) and load through torch.hub.load(source='local')."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    checkout = tmp_path / "checkout"
    for rel in files:
        src = REPO_ROOT / rel
        if src.is_file():
            dst = checkout / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    small = [n for n in ("rpa_cifar_toy", "rga_c_resnet50") if n in zoo.list_models()]
    name = (small or zoo.list_models())[0]
    script = textwrap.dedent(f"""
        import torch, sys
        torch.manual_seed(0)
        model = torch.hub.load({str(checkout)!r}, {name!r}, source="local", trust_repo=True)
        import zoo
        assert zoo.__file__.startswith({str(checkout)!r}), zoo.__file__
        torch.manual_seed(0)
        reference = zoo.create_model({name!r})
        assert type(model) is type(reference)
        a, b = model.state_dict(), reference.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print("OK", type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
