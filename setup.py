"""Distribution ``relzoo``, import package ``zoo``.

The data folders ``configs/``, ``convert/`` and ``ops/`` sit at the repository
root (so torch.hub and a plain checkout find them); a wheel carries copies of
them inside the package as ``zoo/_data/``, which :func:`zoo.paths.data_root`
looks at first.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
EXPORT = ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"]  # the dynamo ONNX exporter and its check
DATA_DIRS = ("configs", "convert", "ops", "weights")  # weights/: our own small checkpoints (RelZoo-mini)


class BuildPyWithData(build_py):
    """Copy the data folders into ``zoo/_data`` of the build tree (wheels only; editable installs read the checkout)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "zoo" / "_data"
        for name in DATA_DIRS:
            if not (ROOT / name).is_dir():
                continue
            shutil.copytree(ROOT / name, target / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))


setup(
    name="relzoo",
    version="0.1.0",
    description="Model zoo for relation- and relative-position-aware attention models in vision",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["zoo", "zoo.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "ninja",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "scipy",
    ],
    extras_require={
        # websocket-client: the site test drives headless Chromium through the DevTools protocol
        "test": ["pytest>=7", "pytest-timeout", "pycocotools>=2.0.7", "build", "wheel", "matplotlib>=3.5",
                 "websocket-client>=1.0", *EXPORT],
        "coco": ["pycocotools>=2.0.7"],
        "video": ["pillow"],
        "viz": ["matplotlib>=3.5"],  # zoo visualize, zoo site, and the plots of zoo train / zoo eval
        "export": EXPORT,            # zoo export --format onnx (and its onnxruntime check)
    },
    entry_points={"console_scripts": ["zoo=zoo.cli:main", "relzoo=zoo.cli:main"]},
    cmdclass={"build_py": BuildPyWithData},
)
