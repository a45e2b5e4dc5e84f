"""camkernels as an edge install sees it, each in a fresh interpreter: the numpy fallback
when numba cannot be imported, and no TensorFlow imported by the kernels."""
import os
import subprocess
import sys

import numpy as np

from explicam.camkernels import kernels as K
from test_camkernels import ROOT, bilinear_loop, close, gradcampp_loop

def run_py(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


FALLBACK = r"""
import sys
sys.modules["numba"] = None  # `import numba` now raises ImportError
import numpy as np
from explicam import camkernels as ck
import explicam.camkernels.kernels
assert ck.BACKEND == "numpy", ck.BACKEND
assert ck.get().backend == "numpy"
try:
    ck.get("numba")
    raise SystemExit("get('numba') should raise")
except RuntimeError as e:
    assert "numba" in str(e)
ck.warmup(); ck.warmup(ck.get("numpy"))
rng = np.random.default_rng(11)
a = rng.random((2, 5, 6, 7), dtype=np.float32); g = rng.standard_normal((2, 5, 6, 7), dtype=np.float32)
np.savez(OUT, mean=ck.channel_mean(g), pp=ck.gradcampp_weights(a, g),
         up=ck.upsample_bilinear(a[..., 0], 9, 13), hires=ck.grad_product_sum(a, g, False))
print("ok")
"""


def test_numpy_fallback_without_numba(tmp_path):
    out = tmp_path / "res.npz"
    res = run_py(f"OUT = {str(out)!r}\n" + FALLBACK)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    notices = [line for line in res.stderr.splitlines() if "numba unavailable" in line]
    assert len(notices) == 1, res.stderr
    assert "numpy" in notices[0]
    got = np.load(out)
    rng = np.random.default_rng(11)
    a = rng.random((2, 5, 6, 7), dtype=np.float32)
    g = rng.standard_normal((2, 5, 6, 7), dtype=np.float32)
    close(got["mean"], g.astype(np.float64).mean(axis=(1, 2)))
    close(got["pp"], gradcampp_loop(a, g))
    close(got["up"], bilinear_loop(a[..., 0], 9, 13))
    close(got["hires"], (g.astype(np.float64) * a).sum(-1))


def test_no_tensorflow_imported():
    res = run_py("import sys, camkernels as ck; ck.warmup(); "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                 "('tensorflow', 'keras', 'tf2onnx', 'tf_keras', 'torch', 'onnx')))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    assert "numba unavailable" not in res.stderr or K.NUMBA_ERROR
