"""The self-contained edge script, run as a user runs it on a board: copied next to the
model, with numba, OpenCV and Pillow made unimportable."""
import shutil
import subprocess
import sys

import cv2
import numpy as np

from explicam.runtime import Explainer
from tests.conftest import ROOT, SIZE

BLOCK = ("import sys\n"
         "for m in ('numba', 'cv2', 'PIL', 'tensorflow', 'keras', 'runtime', 'camkernels', 'explicam'): sys.modules[m] = None\n"
         "import runpy\n"
         "sys.argv = ['embedded.py'] + sys.argv[1:]\n"
         "runpy.run_path('embedded.py', run_name='__main__')\n")


def _board(tmp_path, onnx_model):
    for f in (onnx_model, onnx_model.parent / "model.head.onnx"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(ROOT / "runtime" / "embedded.py", tmp_path / "embedded.py")
    return tmp_path


def test_embedded_runs_with_only_onnxruntime_and_numpy(tmp_path, onnx_model, val_images):
    board = _board(tmp_path, onnx_model)
    photo = cv2.resize(val_images[0][1], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(board / "photo.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    res = subprocess.run([sys.executable, "-c", BLOCK, "model.onnx", "photo.png", "--save-heatmap", "heat.npy"],
                         cwd=board, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "overlay: photo.gradcam.png"

    ref = Explainer(onnx_model).explain(photo, "gradcam")
    expected = ref.top_k(3)[0]
    for line, (name, p) in zip(lines[:3], expected):
        got_name, got_p = line.rsplit(None, 1)
        assert got_name == name and float(got_p.rstrip("%")) / 100 == __import__("pytest").approx(p, abs=1e-4)
    np.testing.assert_allclose(np.load(board / "heat.npy"), ref.heatmaps[0], atol=1e-4)

    overlay = cv2.cvtColor(cv2.imread(str(board / "photo.gradcam.png")), cv2.COLOR_BGR2RGB)
    assert overlay.shape == photo.shape
    hot = np.unravel_index(ref.heatmaps[0].argmax(), ref.heatmaps[0].shape)
    # the hottest pixel is blended with dark red (jet at 1.0 = (128, 0, 0)): red dominates blue there
    assert int(overlay[hot][0]) - int(photo[hot][0]) >= int(overlay[hot][2]) - int(photo[hot][2])


def test_embedded_with_opencv_reads_jpeg_and_agrees_on_the_class(tmp_path, onnx_model, val_images):
    board = _board(tmp_path, onnx_model)
    photo = val_images[0][2]
    cv2.imwrite(str(board / "photo.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
    res = subprocess.run([sys.executable, "embedded.py", "model.onnx", "photo.jpg", "--out", "o.png"],
                         cwd=board, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    top1 = res.stdout.split()[0]
    reread = cv2.cvtColor(cv2.imread(str(board / "photo.jpg")), cv2.COLOR_BGR2RGB)
    assert top1 == Explainer(onnx_model).explain(reread).top_k(1)[0][0][0]
    assert cv2.imread(str(board / "o.png")).shape[:2] == photo.shape[:2]


def test_embedded_bad_input_is_one_line(tmp_path, onnx_model):
    board = _board(tmp_path, onnx_model)
    (board / "empty.png").write_bytes(b"")
    res = subprocess.run([sys.executable, "-c", BLOCK, "model.onnx", "empty.png"], cwd=board,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == "error: empty.png: empty file"
