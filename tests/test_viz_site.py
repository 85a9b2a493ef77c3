"""``zoo visualize`` and ``zoo site``: a visualisation folder of a mini, a site built from a real evaluation and
that folder, rendered in headless Chromium (Debian's chromium, which .ci/run installs): no console error,
every image loaded, a screenshot that is not blank, and the family filter works without a script.
"""
import json
import shutil

import pytest

pytest.importorskip("matplotlib")

import zoo  # noqa: E402
from _chromium import Chromium, chromium_binary, running_in_ci  # noqa: E402
from conftest import picture  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.eval.runner import evaluate  # noqa: E402
from zoo.viz.site import SITE_MARKER, build_site  # noqa: E402
from zoo.viz.visualize import MANIFEST  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_dataset):
    """A results folder as a user makes it: one evaluation and one visualisation of rga_sc_mini."""
    root = tmp_path_factory.mktemp("results")
    data = tiny_dataset("shapes-reid")
    evaluate("rga_sc_mini", data, out=root / "rga_sc_mini" / "eval.json", progress=False)
    image = sorted((data / "query").glob("*.jpg"))[0]
    assert main(["visualize", "rga_sc_mini", "--image", str(image), "--out", str(root / "viz" / "rga"),
                 "--point", "0.3", "0.5"]) == 0
    return root


def test_visualize_writes_every_figure_and_an_index(results):
    folder = results / "viz" / "rga"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["model"] == "rga_sc_mini" and manifest["point"] == [0.3, 0.5]
    files = [f["file"] for f in manifest["figures"]]
    assert files == ["input.png", "spatial_attention.png", "channel_attention.png"]
    html = (folder / "index.html").read_text()
    for file in files:
        assert f'src="{file}"' in html
        picture((folder / file).read_bytes())
    # a folder that is not an earlier visualisation is not replaced; a video model needs --video
    other = results / "not-viz"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    image = str(results / "viz" / "rga" / "input.png")
    assert main(["visualize", "rga_sc_mini", "--image", image, "--out", str(other)]) == 2
    assert (other / "keep.txt").read_text() == "mine"
    assert main(["visualize", "rsanet_mini", "--image", image, "--out", str(results / "v")]) == 2


@pytest.mark.slow
def test_visualize_a_video_model(tmp_path, tiny_dataset):
    data = tiny_dataset("moving-shapes")
    frames = sorted(data.rglob("img_00001.jpg"))[0].parent
    model = zoo.create_model("rsanet_mini", pretrained=True)
    from zoo.viz.visualize import visualize

    index = visualize(model, "rsanet_mini", tmp_path / "out", video=frames, frame=2)
    manifest = json.loads((index.parent / MANIFEST).read_text())
    kernels = [f["file"] for f in manifest["figures"] if f["family"] == "rsa" and f["file"] != "input.png"]
    assert len(kernels) == 3  # one per RSA layer of the mini (stages 1-3)
    for file in kernels:
        picture((index.parent / file).read_bytes())


def test_site_pages(results, tmp_path):
    site = tmp_path / "site"
    index = build_site(site, results=results)
    assert index == site / "index.html" and (site / SITE_MARKER).is_file()
    names = zoo.list_models()
    html = index.read_text()
    for name in names:
        assert f'href="models/{name}.html"' in html
        assert (site / "models" / f"{name}.html").is_file()
    page = (site / "models" / "rga_sc_mini.html").read_text()
    record = json.loads((results / "rga_sc_mini" / "eval.json").read_text())
    assert f"{record['metrics']['rank1']:.2f}" in page  # reproduced next to reported
    assert "python -m zoo eval rga_sc_mini --data" in page  # the command that reproduces it
    assert "python -m zoo train rga_sc_mini" in page  # and the one that trained the weights
    for shown in ("cmc.png", "spatial_attention.png", "channel_attention.png", "loss_synthetic.png"):
        assert f"rga_sc_mini/{shown}" in page and (site / "models" / "rga_sc_mini" / shown).is_file()
    # the card: architecture, weights, preprocessing, license, paper
    for field in ("architecture", "preprocessing", "license", "paper", "weights/rga_sc_mini/"):
        assert field in page
    # a model without weights or results still has its page; rebuilding replaces the site
    assert "No weights published" in (site / "models" / "rga_c_resnet50.html").read_text()
    build_site(site)
    assert "not evaluated" in (site / "models" / "rga_sc_mini.html").read_text()


def test_site_leaves_out_a_plot_that_another_evaluation_replaced(results, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(results / "rga_sc_mini", copy / "rga_sc_mini")
    shutil.copyfile(results / "viz" / "rga" / "spatial_attention.png", copy / "rga_sc_mini" / "cmc.png")
    with pytest.warns(UserWarning, match="was replaced after"):
        build_site(tmp_path / "site", results=copy)
    assert "cmc.png" not in (tmp_path / "site" / "models" / "rga_sc_mini.html").read_text()


def test_site_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ZooError, match="not a site"):
        build_site(tmp_path / "mine")
    with pytest.raises(ZooError, match="not a folder"):
        build_site(tmp_path / "site", results=tmp_path / "missing")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_site_in_headless_chromium(results, tmp_path):
    binary = chromium_binary()
    if binary is None:
        if running_in_ci():
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    site = tmp_path / "site"
    assert main(["site", "--out", str(site), "--results", str(results)]) == 0
    pages = [site / "index.html", site / "models" / "rga_sc_mini.html", site / "models" / "detr_irpe_mini.html",
             site / "models" / "rsanet_r50.html", results / "viz" / "rga" / "index.html"]
    with Chromium(binary) as browser:
        for path in pages:
            report = browser.load(path)
            assert report.errors == [], f"{path}: {report.errors}"
            broken = [src for src, complete, width in report.images if not (complete and width > 0)]
            assert not broken, f"{path}: images that did not load: {broken}"
            picture(report.screenshot)
        assert len(browser.load(pages[1]).images) >= 4
        # the filter is CSS only: choosing a family hides the other families' rows
        browser.load(pages[0])
        visible = ("document.getElementById('family-rga').checked = true; Array.from(document.querySelectorAll("
                   "'tbody tr')).filter(r => getComputedStyle(r).display !== 'none').map(r => r.className)")
        rows = browser.call("Runtime.evaluate", expression=visible, returnByValue=True)["result"]["value"]
        assert rows and all("family-rga" in r for r in rows)
        assert len(rows) == len([n for n in zoo.list_models() if zoo.model_info(n).family == "rga"])
