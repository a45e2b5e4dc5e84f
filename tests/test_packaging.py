"""The installed package: one import root (explicam), an edge install without TensorFlow,
and model.onnx usable as a plain classifier by anyone's onnxruntime."""
import os
import shutil
import subprocess
import sys
import venv
import zipfile

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT

# What a checkout holds beside the package folders; none of it may end up in the wheel.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "data", "out", "report", "build", "dist",
                                    "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the checkout (an in-place build would leave build/
    and egg-info folders in the working tree)."""
    src = tmp_path_factory.mktemp("src") / "explicam"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    dist = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = dist.glob("explicam-*.whl")
    return path


def test_the_wheel_installs_one_import_root(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = {n.split("/")[0] for n in names}
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        declared = z.read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == {"explicam", dist_info}, top_level
    assert declared == ["explicam"]
    for package in ("runtime", "runtime/video", "camkernels", "export", "train", "evaluate", "cluster"):
        assert f"explicam/{package}/__init__.py" in names
    assert "explicam/cli.py" in names and "explicam/runtime/embedded.py" in names
    assert not [n for n in names if n.startswith("explicam/tests")]
    assert "explicam = explicam.cli:main" in entry_points


@pytest.fixture(scope="module")
def edge_venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed, no extras: an edge board."""
    env_dir = tmp_path_factory.mktemp("edge") / "venv"
    venv.create(env_dir, with_pip=False)   # this pip installs into it (--python): no ensurepip, ~10 s less
    py = env_dir / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return env_dir


def test_an_edge_install_explains_without_tensorflow(edge_venv, onnx_model, tmp_path):
    photo = tmp_path / "photo.png"
    img = np.full((96, 128, 3), 90, np.uint8)
    cv2.circle(img, (60, 50), 25, (40, 200, 220), -1)
    assert cv2.imwrite(str(photo), img)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(edge_venv / "bin" / "explicam"), "explain", str(photo), "--model", str(onnx_model),
                          "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "photo_gradcam.png").is_file()
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("file,class_1,prob_1")
    assert rows[1].split(",")[0].endswith("photo.png") and ",gradcam," in rows[1]
    probe = ("import importlib.util as u, explicam, explicam.runtime.explainer as e; "
             "print(u.find_spec('tensorflow') is None, u.find_spec('keras') is None, "
             "u.find_spec('cv2').origin.count('site-packages') > 0, explicam.__file__)")
    res = subprocess.run([str(edge_venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    no_tf, no_keras, has_cv2, where = res.stdout.split()
    assert (no_tf, no_keras, has_cv2) == ("True", "True", "True")
    assert str(edge_venv) in where  # the installed copy, not the checkout


def test_show_without_a_gui_build_says_what_to_install(edge_venv, onnx_model, tmp_path):
    """The base install is opencv-python-headless: --show says in one line what to install."""
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.full((48, 64, 3), 120, np.uint8))
    writer.release()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DISPLAY"] = ":0"  # a display is there: only the OpenCV build is missing
    res = subprocess.run([str(edge_venv / "bin" / "explicam"), "explain", "--video", str(clip), "--show",
                          "--model", str(onnx_model)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "opencv-python-headless" in res.stderr and "pip install opencv-python" in res.stderr


def test_model_onnx_is_a_plain_classifier(onnx_model, val_images):
    """Anyone's onnxruntime runs model.onnx with the image alone: target defaults to top-1."""
    import onnxruntime as ort

    from explicam import Explainer

    ex = Explainer(onnx_model, warmup=False)
    x = ex.model.preprocess(val_images[0])
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]  # target: an input with a default
    plain = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x})))
    e = np.exp(plain["logits"] - plain["logits"].max(axis=1, keepdims=True))
    np.testing.assert_allclose(plain["probabilities"], e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert (plain["target_used"] == plain["logits"].argmax(axis=1)).all()
    explicit = session.run(None, {"image": x, "target": np.full(len(x), -1, np.int64)})
    np.testing.assert_array_equal(plain["grads"], explicit[[o.name for o in session.get_outputs()].index("grads")])
    # an explicit class still wins over the default
    other = (plain["target_used"] + 1) % len(ex.class_names)
    used = session.run(["target_used"], {"image": x, "target": other.astype(np.int64)})[0]
    np.testing.assert_array_equal(used, other)


def test_python_surface_is_short_and_documented():
    import explicam

    assert explicam.__version__ and explicam.__doc__ and "Explainer" in explicam.__doc__
    assert set(explicam.__all__) == {"Explainer", "Explanation", "__version__"}
    from explicam import Explainer, Explanation

    assert Explainer.__module__ == "explicam.runtime.explainer" and Explanation.__doc__ is not None
