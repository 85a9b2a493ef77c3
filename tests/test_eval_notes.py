"""What ``zoo eval`` says besides the numbers: a split other than the reported one is "not comparable",
per-class rows carry the class names; and the progress bars a person sees on a terminal."""
from __future__ import annotations

import fcntl
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest

from conftest import REPO_ROOT
from zoo.config import ReportedMetric
from zoo.data.labels import LABEL_SETS
from zoo.data.synthetic import make_dataset
from zoo.eval.runner import _compare, evaluate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_dataset(kind, root / kind, split="val", seed=0, size="tiny") for kind in ("shapes-cls", "shapes-det")}


def test_a_smaller_split_than_the_reported_one_is_not_comparable(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="zoo.eval.runner"):
        result = evaluate("sasa_resnet_mini", tiny["shapes-cls"], progress=False)
    assert result.num_samples == 20 and result.split == "val"
    assert all(row.reported is not None and "reported on 500 samples, evaluated on 20" in row.not_comparable
               for row in result.rows)
    table = result.table()
    assert "**not comparable**: reported on 500 samples, evaluated on 20" in table
    assert all("| not comparable |" in line for line in table.splitlines() if line.startswith("| top"))
    assert "not comparable with the reported numbers" in caplog.text  # said loudly
    # per class, with the weights' class names
    assert [row["label"] for row in result.per_class] == list(LABEL_SETS["shapes-cls"])
    assert all(row["samples"] == 2 and 0 <= row["top1"] <= 100 for row in result.per_class)
    assert "| 0 circle |" in table


def test_the_reported_split_is_comparable_and_a_limit_is_not():
    reported = [ReportedMetric("top1", 36.8, "shapes_cls_val", "x", split="val", num_samples=500)]
    (row,) = _compare({"top1": 36.8}, reported, "shapes_cls_val", split="val", num_samples=500)
    assert row.not_comparable == "" and row.difference == 0
    (row,) = _compare({"top1": 36.8}, reported, "shapes_cls_val", split="train", num_samples=500)
    assert row.not_comparable == "reported on split 'val', evaluated on 'train'"
    (row,) = _compare({"top1": 36.8}, reported, "shapes_cls_val", split="val", num_samples=100, limited=True)
    assert row.not_comparable == "reported on 500 samples, evaluated on 100; a --limit run"


def test_coco_per_class_ap_uses_the_class_names(tiny):
    result = evaluate("detr_irpe_mini", tiny["shapes-det"], progress=False)
    assert {row["label"] for row in result.per_class} <= {"circle", "square", "triangle"} and result.per_class
    assert all(0 <= row["AP"] <= 100 and 0 <= row["AP50"] <= 100 for row in result.per_class)
    assert any(row.not_comparable for row in result.rows)  # 8 images, not the 400 of the reported split


# ---------------------------------------------------------------------------------------------
# Progress bars


def _run_on_terminal(args: list[str], cwd) -> str:
    """Run ``python -m zoo ARGS`` with stderr on a pseudo-terminal; its stderr as text."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a fresh pty is 0 x 0
    env = {**os.environ}
    env.pop("RELZOO_NO_PROGRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "zoo", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=120)
    os.close(leader)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_on_a_terminal_unless_quiet(tmp_path):
    shown = _run_on_terminal(["data", "make", "shapes-cls", "--size", "tiny", "--out", str(tmp_path / "a")],
                             REPO_ROOT)
    assert "shapes-cls train" in shown and "image" in shown  # tqdm's bar, on stderr
    quiet = _run_on_terminal(["data", "make", "shapes-cls", "--size", "tiny", "--out", str(tmp_path / "b"), "--quiet"],
                             REPO_ROOT)
    assert "shapes-cls train" not in quiet


def test_progress_bars_stay_silent_when_output_is_not_a_terminal(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RELZOO_NO_PROGRESS"}
    result = subprocess.run([sys.executable, "-m", "zoo", "data", "make", "shapes-cls", "--size", "tiny", "--out",
                             str(tmp_path / "c")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "shapes-cls train" not in result.stderr
