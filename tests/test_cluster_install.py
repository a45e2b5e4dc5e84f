"""The cluster extra stays optional: base and [train] bring no Ray, the edge path never
imports it, and --ray without it says what to install. Needs no Ray itself."""
import subprocess
import sys
import tomllib

from tests.conftest import ROOT

BLOCK_RAY = "import sys\nfor m in ('ray', 'pyarrow'): sys.modules[m] = None\n"


def test_ray_is_only_in_the_cluster_extra():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["train"]
    assert not [d for d in deps if d.lower().startswith(("ray", "pyarrow"))], deps
    assert any(d.startswith("ray[data]") for d in project["optional-dependencies"]["cluster"])
    assert meta["tool"]["setuptools"]["package-dir"]["explicam.cluster"] == "cluster"


def test_the_edge_path_never_imports_ray_and_cluster_modules_import_without_it():
    code = BLOCK_RAY + (
        "import importlib, pkgutil\n"
        "for pkg in ('explicam.runtime', 'explicam.runtime.video', 'explicam.camkernels', 'explicam.cluster'):\n"
        "    for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):\n"
        "        importlib.import_module(pkg + '.' + info.name)\n"
        "import explicam.train.stream\n"
        "bad = [m for m in ('ray', 'tensorflow', 'torch') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "from explicam.cluster import connect\n"
        "try:\n"
        "    connect()\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "pip install '.[cluster]'" in res.stdout


def test_explain_ray_without_ray_says_what_to_install(tmp_path):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 40, 3), 120, np.uint8))
    code = BLOCK_RAY + ("import runpy\n"
                        f"sys.argv = ['cli.py', 'explain', {str(tmp_path / 'a.png')!r}, '--model', "
                        f"{str(tmp_path / 'model.onnx')!r}, '--out', {str(tmp_path / 'out')!r}, '--ray']\n"
                        "runpy.run_path('cli.py', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "[cluster]" in res.stderr
