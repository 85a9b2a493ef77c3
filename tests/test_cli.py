"""`python -m zoo`: every command has --help; errors are one line and a non-zero exit."""
import subprocess
import sys

import pytest

import zoo
from zoo.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "zoo", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["list", "info", "convert", "export", "predict", "eval"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_list_prints_every_model(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in zoo.list_models())


def test_info_shows_weights_and_reported_table(capsys):
    for name in zoo.list_models():
        assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "reported" in out


def test_unknown_model_is_one_clear_line():
    result = run("info", "no_such_model")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown model 'no_such_model'" in result.stderr


def test_convert_of_a_missing_file_is_one_clear_line(tmp_path):
    result = run("convert", "--from", "torchvision-resnet", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    assert "missing.pth" in result.stderr and "Traceback" not in result.stderr


def test_readme_model_table_is_generated_from_the_registry():
    from conftest import REPO_ROOT

    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "model_table.py"), "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_export_writes_a_folder_that_loads_back(tmp_path):
    import json

    import torch

    out = tmp_path / "exported"
    assert main(["export", "rpa_cifar_toy", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    assert json.loads((out / "config.json").read_text())["model"] == "rpa_cifar_toy"
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: relzoo")
    torch.manual_seed(1)
    model = zoo.create_model("rpa_cifar_toy", weights=str(out))
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# Every command, as `python -m zoo COMMAND --help` spells it.
COMMANDS = ["list", "info", "convert", "export", "predict", "eval", "train", "data", "data make", "demo", "visualize",
            "site"]


def _imported_modules(*args) -> set[str]:
    """The modules `python -X importtime -m zoo ARGS` imports (importtime writes one stderr line per module)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "zoo", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_commands_cover_the_parser():
    import argparse

    from zoo.cli import build_parser

    def names(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield prefix + name
                    yield from names(child, f"{prefix}{name} ")

    assert sorted(names(build_parser())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", [""] + COMMANDS)
def test_help_imports_no_torch(command):
    """Arguments are parsed before torch is imported: every --help answers at once."""
    modules = _imported_modules(*command.split(), "--help")
    assert "zoo.cli" in modules and "torch" not in modules


def test_list_imports_no_detection_code():
    modules = _imported_modules("list")
    assert not any(m.startswith("torchvision.models.detection") for m in modules)
