"""The Hugging Face round trip: ``zoo.save_pretrained`` -> ``zoo.from_pretrained`` (a folder or ``hf://``),
``zoo.push_to_hub`` through ``huggingface_hub.HfApi`` against the loopback server of ``_http_server``
(its upload endpoints; no mock of huggingface_hub), and model cards that ``huggingface_hub.ModelCard``
loads, for every registered model's weights and for what ``zoo export`` writes."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import zoo
from _http_server import serve
from conftest import REPO_ROOT
from zoo.cli import main
from zoo.config import PretrainedCfg
from zoo.data.labels import LABEL_SETS
from zoo.errors import UploadError, WeightsError
from zoo.hub import model_card, save_pretrained
from zoo.registry import model_info

MINIS = ["detr_irpe_mini", "handraise_rpa_mini", "rga_sc_mini", "rsanet_mini", "sasa_resnet_mini"]
INPUTS = {"detr_irpe_mini": (3, 64, 80), "handraise_rpa_mini": (3, 64, 80), "rga_sc_mini": (3, 64, 32),
          "rsanet_mini": (24, 48, 48), "sasa_resnet_mini": (3, 64, 64)}
TOKEN = "hf_loopback_token"


@pytest.fixture(autouse=True)
def _hf_env(monkeypatch):
    """Hub files into RELZOO_HOME (not a user's HF cache), no saved token, no bars."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "RELZOO_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RELZOO_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _outputs(model, name: str):
    x = torch.rand(1, *INPUTS[name], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(list(x)) if name in ("detr_irpe_mini", "handraise_rpa_mini") else model(x)
    if isinstance(out, dict):
        return [out["pred_logits"], out["pred_boxes"]]
    if isinstance(out, list):  # torchvision detections
        return [out[0]["boxes"], out[0]["scores"]]
    return [out]


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# save_pretrained -> from_pretrained


@pytest.mark.parametrize("name", MINIS)
def test_save_pretrained_then_from_pretrained_gives_identical_outputs(tmp_path, name):
    model = zoo.create_model(name, pretrained=True)
    folder = zoo.save_pretrained(model, tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == name and config["kwargs"] == model.pretrained_cfg.model_kwargs
    assert "source" not in config  # the packaged weights have no public address: never a local path
    assert config["source_sha256"] == model_info(name).weights_entry().sha256 and config["license"] == "unknown"
    saved = config["pretrained_cfg"]
    assert saved["preprocessing"] == json.loads(json.dumps(dict(model_info(name).preprocessing)))
    assert saved.get("label_names") == (list(model.pretrained_cfg.label_names) if model.pretrained_cfg.label_names else None)

    rebuilt = zoo.from_pretrained(folder)  # from the folder alone
    assert type(rebuilt) is type(model) and not rebuilt.training
    _same(_outputs(model, name), _outputs(rebuilt, name))
    pre = rebuilt.pretrained_cfg
    assert (pre.architecture, pre.tag, pre.label_names, pre.preprocessing) == (
        name, "synthetic", model.pretrained_cfg.label_names, model.pretrained_cfg.preprocessing)
    assert pre.reported == model.pretrained_cfg.reported and pre.source == str(folder)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "relzoo" and "zoo.from_pretrained(" in card.text


def test_a_fine_tuned_head_round_trips_with_its_class_names(tmp_path):
    model = zoo.create_model("sasa_resnet_mini", pretrained=True, num_classes=3)
    model.pretrained_cfg = model.pretrained_cfg.replace(label_names=["cat", "dog", "bird"])
    with torch.no_grad():
        model.fc.weight.mul_(2)  # "fine-tuned"
    folder = zoo.save_pretrained(model, tmp_path / "tuned", repo_id="me/tuned")
    config = json.loads((folder / "config.json").read_text())
    assert config["source"] == "hf://me/tuned" and config["kwargs"]["num_classes"] == 3
    rebuilt = zoo.from_pretrained(folder)
    assert rebuilt.pretrained_cfg.label_names == ("cat", "dog", "bird")
    _same(_outputs(model, "sasa_resnet_mini"), _outputs(rebuilt, "sasa_resnet_mini"))
    assert "zoo.from_pretrained('hf://me/tuned')" in (folder / "README.md").read_text()
    # reset_classifier after creation is recorded too
    model.reset_classifier(4, global_pool="max")
    model.pretrained_cfg = model.pretrained_cfg.replace(label_names=None)  # the three names no longer fit
    config = json.loads((zoo.save_pretrained(model, tmp_path / "four") / "config.json").read_text())
    assert config["kwargs"]["num_classes"] == 4 and config["kwargs"]["global_pool"] == "max"


def test_save_pretrained_refuses_names_that_do_not_fit_and_bare_models(tmp_path):
    model = zoo.create_model("sasa_resnet_mini", pretrained=True)
    model.reset_classifier(4)  # the shape names (10) no longer fit
    with pytest.raises(Exception, match="label_names has 10 names but the model has 4"):
        zoo.save_pretrained(model, tmp_path / "x")
    with pytest.raises(Exception, match="needs a model built by zoo.create_model"):
        zoo.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "y")


def test_features_and_random_init_models_round_trip(tmp_path):
    backbone = zoo.create_model("rga_sc_mini", pretrained=True, features_only=True, out_indices=(2, 4))
    rebuilt = zoo.from_pretrained(zoo.save_pretrained(backbone, tmp_path / "backbone"))
    assert rebuilt.out_indices == (2, 4) and rebuilt.feature_info.channels() == [64, 256]
    x = torch.rand(1, 3, 64, 32)
    with torch.no_grad():
        _same(backbone(x), rebuilt(x))
    torch.manual_seed(0)
    deit = zoo.create_model("deit_tiny_patch16_224_ctx_product_50_shared_k", img_size=32).eval()
    folder = zoo.save_pretrained(deit, tmp_path / "deit")
    config = json.loads((folder / "config.json").read_text())
    assert "source" not in config and "source_sha256" not in config and config["license"] == "mit"
    again = zoo.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(deit(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))),
                           again(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))))


def test_from_pretrained_needs_a_folder_with_a_config(tmp_path):
    with pytest.raises(WeightsError, match="not a folder"):
        zoo.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        zoo.from_pretrained(tmp_path / "empty")
    with pytest.raises(WeightsError, match="needs a folder"):
        zoo.from_pretrained("hf://org/repo/model.safetensors")


# ---------------------------------------------------------------------------------------------
# Model cards


def _front(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---\n")[1])


def test_model_card_loads_for_every_registered_model_and_weights(tmp_path):
    """The card of every weights entry (and of every model at random init): ModelCard.load reads it, its
    model-index lists the entry's reported metrics, and the metadata the Hub shows is there."""
    for name in zoo.list_models():
        cfg = model_info(name)
        for entry in [None, *cfg.weights.values()]:
            pre = PretrainedCfg.build(cfg, entry, label_names=zoo.data.label_names(entry.label_names) if entry else None)
            config = {"model": name, "kwargs": dict(cfg.kwargs)}
            path = tmp_path / f"{name}-{entry.tag if entry else 'random'}.md"
            path.write_text(model_card(name, config, "test origin", pretrained_cfg=pre), encoding="utf-8")
            card = ModelCard.load(path)
            data = card.data
            assert data.library_name == "relzoo" and data.license and data.pipeline_tag, name
            assert cfg.family in data.tags and "relzoo" in data.tags
            metrics = [(r.metric_type, r.metric_value) for r in (data.eval_results or [])]
            assert metrics == [(r.metric, r.value) for r in pre.reported], name
            if "arXiv" in cfg.paper:
                assert any(tag.startswith("arxiv:") for tag in data.tags), name


def test_exported_cards_load_and_list_reproduced_metrics(tmp_path):
    results = {"model": "sasa_resnet_mini", "dataset": "shapes_cls_val", "split": "val", "num_samples": 500,
               "limited": False, "metrics": {"top1": 36.8, "top5": 89.2}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    for name in MINIS + ["rpa_cifar_toy"]:
        out = tmp_path / name
        extra = ["--eval-results", str(tmp_path / "results.json")] if name == "sasa_resnet_mini" else []
        assert main(["export", name, "--out", str(out), "--repo-id", f"relzoo/{name}", *extra]) == 0
        card = ModelCard.load(out / "README.md")
        assert card.data.library_name == "relzoo" and card.data.license
        assert f"zoo.from_pretrained('hf://relzoo/{name}')" in card.text
        config = json.loads((out / "config.json").read_text())
        assert config["source"] == f"hf://relzoo/{name}"
        assert not Path(config["source"]).exists()
    names = [r.metric_name for r in ModelCard.load(tmp_path / "sasa_resnet_mini" / "README.md").data.eval_results]
    assert names == ["top1", "top5", "top1 (reproduced by zoo eval)", "top5 (reproduced by zoo eval)"]
    partial = {**results, "limited": True}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    assert main(["export", "sasa_resnet_mini", "--out", str(tmp_path / "p"), "--eval-results",
                 str(tmp_path / "partial.json")]) == 2  # a --limit run is not a result for the card


def test_conversion_and_training_cards_load(tmp_path):
    from zoo.factory import convert_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "toy.pt"
    torch.save(zoo.create_model("rpa_cifar_toy").state_dict(), path)
    out = convert_checkpoint(path, "rpa-toy", tmp_path / "converted")
    assert ModelCard.load(out / "README.md").data.library_name == "relzoo"
    assert "zoo.from_pretrained(" in (out / "README.md").read_text()
    assert _front(REPO_ROOT / "weights" / "sasa_resnet_mini" / "README.md")  # committed cards stay readable


# ---------------------------------------------------------------------------------------------
# push_to_hub against the loopback Hub


def test_push_to_hub_through_xet_uploads_and_commits(tmp_path):
    """hf_xet installed: upload_folder sends model.safetensors through Xet storage. The loopback server
    speaks the CAS v1 upload protocol; the commit then records the file by its sha256 (serving it back
    would need the xorbs decoded, which the test server does not do: the LFS test below reads it back)."""
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    if not is_xet_available() or constants.HF_HUB_DISABLE_XET:
        pytest.skip("hf_xet is not installed or HF_HUB_DISABLE_XET is set")
    model = zoo.create_model("sasa_resnet_mini", pretrained=True)
    local = save_pretrained(model, tmp_path / "local", repo_id="org/mini")
    with serve(write_token=TOKEN) as server:
        address = zoo.push_to_hub(model, "org/mini", token=TOKEN, endpoint=server.endpoint)
        assert address == f"hf://org/mini@{server.commit}"
        assert server.xorbs and server.shards
        sha, size = server.xet_files["org/mini"]["model.safetensors"]
        weights = (local / "model.safetensors").read_bytes()
        assert (sha, size) == (hashlib.sha256(weights).hexdigest(), len(weights))
        files = server.hf_repos["org/mini"]
        assert files["config.json"] == (local / "config.json").read_bytes()
        assert files["README.md"] == (local / "README.md").read_bytes()
        assert server.commits[-1]["summary"] == "Upload sasa_resnet_mini with RelZoo"


def test_push_to_hub_refusals_are_upload_errors():
    model = zoo.create_model("rpa_cifar_toy")
    with serve(write_token=TOKEN) as server:
        with pytest.raises(UploadError, match="push to hf://org/toy failed.*401"):
            zoo.push_to_hub(model, "org/toy", token="hf_wrong", endpoint=server.endpoint)
        assert "org/toy" not in server.hf_repos


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained_round_trip_over_lfs(tmp_path):
    """Xet off (HF_HUB_DISABLE_XET=1, read when huggingface_hub is imported: a fresh process): the file goes
    through the LFS batch API and a PUT; from_pretrained('hf://...') reads the pushed repo back through
    the resolve endpoints and gives the same outputs; ModelCard.load reads the pushed card from the Hub."""
    script = textwrap.dedent(f"""
        import json, sys, torch, zoo
        from huggingface_hub import ModelCard, constants
        assert constants.HF_HUB_DISABLE_XET
        model = zoo.create_model("rsanet_mini", pretrained=True)
        address = zoo.push_to_hub(model, "org/rsa", token={TOKEN!r}, eval_results=None)
        rebuilt = zoo.from_pretrained(address)
        x = torch.rand(2, 24, 48, 48, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(model(x), rebuilt(x))
        assert rebuilt.pretrained_cfg.label_names == model.pretrained_cfg.label_names
        card = ModelCard.load("org/rsa")
        assert card.data.library_name == "relzoo" and card.data.pipeline_tag == "video-classification"
        print("OK", address)
    """)
    with serve(write_token=TOKEN) as server:
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_CACHE": str(tmp_path / "hf-cache")}
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "OK hf://org/rsa@" in result.stdout
        assert server.count("PUT") == 1 and not server.xorbs  # one LFS upload, no Xet
        assert server.count("POST", "/org/rsa.git/info/lfs/objects/batch") == 1
        assert set(server.hf_repos["org/rsa"]) == {"README.md", "config.json", "model.safetensors"}
