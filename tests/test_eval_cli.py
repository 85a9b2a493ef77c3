"""`python -m zoo eval` end to end: a real model and protocol, one process and two under torchrun."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pycocotools")

from test_irpe_coco import TINY, write_coco  # noqa: E402  (the tiny COCO-layout writer)

from zoo.export import export_model  # noqa: E402


def zoo_eval(*args, processes=1):
    launcher = [sys.executable, "-m", "zoo"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "zoo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RELZOO_DIST_BACKEND": "gloo"}
    return subprocess.run([*launcher, "eval", *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_coco_eval_one_and_two_processes_agree(tmp_path):
    data = write_coco(tmp_path / "coco")
    weights = export_model("detr_r50_irpe", tmp_path / "weights", **TINY)
    common = ["detr_r50_irpe", "--data", str(data), "--weights", str(weights), "--batch-size", "2", "--no-progress"]

    one = zoo_eval(*common, "--out", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "| metric | reported | reproduced | difference | source |" in one.stdout
    two = zoo_eval(*common, "--out", str(tmp_path / "two.json"), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]

    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert first["metrics"] and first["metrics"] == second["metrics"]
    assert first["num_samples"] == second["num_samples"] == 3
    assert (tmp_path / "one.md").read_text().startswith("detr_r50_irpe")


def test_missing_dataset_is_one_line_naming_the_expected_file(tmp_path):
    result = zoo_eval("detr_r50_irpe", "--data", str(tmp_path / "nowhere"), "--weights", str(tmp_path))
    assert result.returncode == 2
    assert "instances_val2017.json" in result.stderr and "Traceback" not in result.stderr
