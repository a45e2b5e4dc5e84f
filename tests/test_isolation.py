"""The edge runtime never imports TensorFlow, Keras or tf2onnx."""
import subprocess
import sys

from tests.conftest import ROOT

BLOCK = "import sys\nfor m in ('tensorflow', 'keras', 'tf2onnx', 'tf_keras'): sys.modules[m] = None\n"


def test_runtime_and_camkernels_import_without_tensorflow():
    code = BLOCK + (
        "import explicam.camkernels, explicam.runtime, explicam.runtime.images, explicam.runtime.model, explicam.runtime.methods, explicam.runtime.explainer\n"
        "import importlib, pkgutil\n"
        "for pkg in ('explicam.runtime', 'explicam.runtime.video', 'explicam.camkernels'):\n"
        "    for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__):\n"
        "        importlib.import_module(pkg + '.' + info.name)\n"
        "from explicam import Explainer\n"
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_blocking_really_blocks():
    # The guard above would pass vacuously if the block did not work; prove it does.
    res = subprocess.run([sys.executable, "-c", BLOCK + "import tensorflow"], capture_output=True, text=True)
    assert res.returncode != 0 and "import of tensorflow halted" in res.stderr


def test_training_on_an_edge_install_says_what_to_install(tmp_path):
    code = BLOCK + ("import runpy\n"
                    f"sys.argv = ['cli.py', 'train', '--data', {str(tmp_path)!r}]\n"
                    "runpy.run_path('cli.py', run_name='__main__')\n")
    (tmp_path / "training" / "a").mkdir(parents=True)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "needs TensorFlow" in res.stderr and "[train]" in res.stderr
