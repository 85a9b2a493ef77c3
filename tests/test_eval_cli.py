"""`python -m zoo eval` end to end: a real model and protocol, one process and two under torchrun."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pycocotools")

from test_irpe_coco import TINY, write_coco  # noqa: E402  (the tiny COCO-layout writer)

from zoo import demo  # noqa: E402
from zoo.data.synthetic import make_dataset  # noqa: E402
from zoo.eval import DEFAULT_BATCH_SIZE  # noqa: E402
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


# The split each mini is evaluated on here: its demo dataset, tiny where that still has two batches of the
# default batch size, with --limit 12 (a full batch of 8 on rank 0, a short one of 4 on rank 1).
_MINI_SPLITS = {"shapes-det": "default", "raised-hands": "default", "shapes-reid": "tiny", "moving-shapes": "default",
                "shapes-cls": "tiny"}


@pytest.mark.slow
@pytest.mark.parametrize("mini", demo.MINIS, ids=[m.name for m in demo.MINIS])
def test_every_mini_gives_the_same_metrics_on_one_and_two_processes(tmp_path, mini):
    """Whole batches of a one-process run are dealt to the ranks, so a detector pads exactly as on one process
    and the metrics are equal at the default batch size; the JSON records batch and world size."""
    data = make_dataset(mini.kind, tmp_path / mini.kind, split="val", seed=mini.seed, size=_MINI_SPLITS[mini.kind])
    common = [mini.name, "--data", str(data), "--limit", "12", "--no-progress"]
    results = {}
    for processes in (1, 2):
        run = zoo_eval(*common, "--out", str(tmp_path / f"{processes}.json"), processes=processes)
        assert run.returncode == 0, run.stderr[-3000:]
        results[processes] = json.loads((tmp_path / f"{processes}.json").read_text())
    assert results[1]["metrics"] and results[1]["metrics"] == results[2]["metrics"]
    assert [(r["batch_size"], r["world_size"], r["num_samples"]) for r in results.values()] == \
        [(DEFAULT_BATCH_SIZE, 1, 12), (DEFAULT_BATCH_SIZE, 2, 12)]
