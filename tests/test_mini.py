"""RelZoo-mini (issue 10): every registered mini model loads its committed weights by name through the
normal pretrained path and reproduces its reported metrics on the generated validation split
(the demo's own code path, full split, tolerance 0.1); the demo's table and --check logic.

Each full evaluation takes seconds on one CPU thread (the minis are small and so are the splits).
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo import demo
from zoo.registry import model_info

REGISTERED = [m for m in demo.MINIS if m.name in zoo.list_models()]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("demo-data")


def test_every_family_has_a_registered_mini():
    assert [m.name for m in REGISTERED] == [m.name for m in demo.MINIS]
    assert sorted({model_info(m.name).family for m in REGISTERED}) == ["irpe", "rga", "rpa", "rsa", "sasa"]


@pytest.mark.parametrize("mini", REGISTERED, ids=[m.name for m in REGISTERED])
def test_mini_config_and_weights(mini):
    """A registered mini has committed weights (<= 5 MB, pinned sha256) and reported metrics."""
    cfg = model_info(mini.name)
    assert cfg.default_weights is not None, f"{mini.name} has no default weights"
    entry = cfg.weights_entry()
    folder = REPO / entry.source
    weights = folder / "model.safetensors"
    assert weights.is_file(), f"{weights} is missing"
    assert weights.stat().st_size <= 5 * 2**20, f"{weights} is larger than 5 MB"
    assert entry.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    recorded = json.loads((folder / "config.json").read_text())
    assert recorded["model"] == mini.name
    assert recorded["train"]["dataset"]["synthetic"]["kind"] == mini.kind
    rows = cfg.reported_for(None)
    assert rows and all(r.weights == cfg.default_weights for r in rows)
    assert "chance" in cfg.notes.lower()


@pytest.mark.parametrize("mini", REGISTERED, ids=[m.name for m in REGISTERED])
def test_mini_reproduces_reported(mini, data_root):
    """The demo's path on the full validation split: reproduced == reported within the tolerance."""
    rows = demo.run_demo(data_root, [mini.name], log=None)
    assert rows and all(r.reported is not None for r in rows), rows
    assert demo.check_rows(rows) == [], demo.format_table(rows)
    chance = json.loads((data_root / mini.kind / "synthetic.json").read_text())["splits"]["val"]["chance"]
    for row in rows:
        if row.metric in chance:  # clearly above chance: by the chance level itself, or a quarter of the headroom
            c = chance[row.metric]
            assert row.reproduced > c + min(c, (100 - c) / 4), (row, chance)


def test_table_and_check_logic():
    rows = [demo.DemoRow("sasa", "m", "top1", 50.0, 50.04), demo.DemoRow("sasa", "m", "top5", 90.0, 90.3)]
    table = demo.format_table(rows)
    assert table.splitlines()[0] == "| family | model | metric | reported | reproduced | difference |"
    assert "| sasa | m | top1 | 50.00 | 50.04 | +0.04 |" in table
    assert demo.format_table([demo.DemoRow("rga", "m", "mAP", 8.08, 8.0799)]).endswith("| +0.00 |")
    problems = demo.check_rows(rows)
    assert len(problems) == 1 and "top5" in problems[0]
    assert demo.check_rows(rows[:1]) == []
    assert demo.check_rows([demo.DemoRow("sasa", "m", "top1", None, 50.0)]) == ["m: no reported metric to compare with"]
    assert demo.check_rows([]) != []


def test_unknown_mini_is_an_error():
    with pytest.raises(ValueError, match="unknown mini"):
        demo.registered_minis(["not_a_mini"])


@pytest.mark.skipif(not REGISTERED, reason="no mini registered")
def test_cli_check(data_root, capsys):
    """``python -m zoo demo --check`` on one mini: the table and exit status 0 (data reused from the test above)."""
    from zoo.cli import main

    mini = REGISTERED[-1]
    assert main(["demo", "--data-root", str(data_root), "--models", mini.name, "--check"]) == 0
    out = capsys.readouterr().out
    assert "| family | model | metric | reported | reproduced | difference |" in out
    assert "check passed" in out


def test_a_row_measured_on_another_split_fails_the_check():
    row = demo.DemoRow("sasa", "m", "top1", 50.0, 50.0, not_comparable="reported on 500 samples, evaluated on 20")
    assert demo.check_rows([row]) == ["m top1: not comparable (reported on 500 samples, evaluated on 20)"]
    assert demo.format_table([row]).endswith("| not comparable |")
