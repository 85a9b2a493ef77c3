"""The evaluation runner: sharding without duplicates, gathering in order, equal results for 1 and 2 processes."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import subprocess_env
from zoo.config import ReportedMetric
from zoo.eval.metrics import topk_accuracy
from zoo.eval.runner import EvalResult, _compare

# A toy protocol whose metric depends on every sample and on their order, so a lost,
# duplicated or misplaced prediction changes the number.
TOY = textwrap.dedent("""
    import sys, json, torch
    from pathlib import Path
    from zoo.config import ModelConfig
    from zoo.eval.protocol import Protocol, register_protocol
    from zoo.eval.runner import finish_distributed, run_protocol

    @register_protocol("toy")
    class Toy(Protocol):
        def dataset(self):
            g = torch.Generator().manual_seed(0)
            return [(i, torch.randn(4, generator=g)) for i in range(self.limit or 37)]
        def collate(self, items):
            return torch.tensor([i for i, _ in items]), torch.stack([x for _, x in items])
        def predict(self, model, batch, device):
            ids, x = batch
            return [(int(i), float(y)) for i, y in zip(ids, model(x).sum(1))]
        def compute(self, predictions):
            ids = [i for i, _ in predictions]
            assert ids == list(range(len(ids))), ids
            return {"weighted": sum((k + 1) * y for k, (_, y) in enumerate(predictions)), "n": len(predictions)}

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    cfg = ModelConfig(name="toy", family="toy", task="t")
    metrics, n = run_protocol(model, Toy(Path("."), cfg, {}), batch_size=4, progress=False)
    finish_distributed()
    if metrics:
        Path(sys.argv[1]).write_text(json.dumps(metrics))
""")


def test_two_gloo_processes_equal_one_process(tmp_path):
    script = tmp_path / "toy_eval.py"
    script.write_text(TOY)
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    # this checkout's zoo, whether or not (and wherever) the package is installed
    env = subprocess_env(RELZOO_DIST_BACKEND="gloo", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), str(single)], check=True, timeout=300, env=env)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(double)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(single.read_text()) == json.loads(double.read_text())
    assert json.loads(single.read_text())["n"] == 37


def test_topk_accuracy_in_percent_with_stable_ties():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    # Row 2 is a tie: the stable order puts class 0 first, so top-1 misses it.
    assert topk_accuracy(logits, labels, ks=(1, 2)) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})
    with pytest.raises(ValueError, match="logits"):
        topk_accuracy(logits, labels[:2])


def test_compare_matches_reported_rows_by_metric_and_dataset():
    reported = [ReportedMetric("top1", 80.0, "imagenet", "paper"), ReportedMetric("top1", 70.0, "other", "x")]
    rows = _compare({"top1": 79.5, "top5": 95.0}, reported, "imagenet")
    assert (rows[0].reported, rows[0].difference) == (80.0, -0.5)
    assert rows[1].reported is None
    table = EvalResult("m", "tag", "imagenet", "imagenet", 10, True, rows).table()
    assert "| top1 | 80.00 | 79.50 | -0.50 | paper |" in table and "--limit" in table


def test_shard_batches_deals_the_one_process_batches_whole():
    from zoo.eval.runner import shard_batches

    one = shard_batches(21, 8, 0, 1)
    assert one == [list(range(0, 8)), list(range(8, 16)), list(range(16, 21))]
    for world in (2, 3, 5):
        shards = [shard_batches(21, 8, rank, world) for rank in range(world)]
        assert sorted(b for shard in shards for b in shard) == one  # the same batches, each once
        assert shards[0][0] == one[0] and (world < 4 or shards[3] == [])
    with pytest.raises(ValueError, match="batch_size"):
        shard_batches(10, 0, 0, 1)
