"""runtime.model.session_options: onnxruntime's threads spin between the ops of a call, and
stop when the call returns (a webcam loop idles between frames; the numba kernels after a
call need the cores). Measured as the process's CPU time while it sleeps after each call, in
a fresh interpreter (no other library's threads), against the same options with the stop
left out, which must burn a core: otherwise the check could not see spinning at all."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
from explicam.runtime.model import session_options

w = np.random.default_rng(0).standard_normal((32, 3, 3, 3)).astype(np.float32)
graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])],
                          "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 128, 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
opts = session_options(2)
if sys.argv[1] == "no-stop":
    opts.add_session_config_entry("session.force_spinning_stop", "0")
s = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                         opts, providers=["CPUExecutionProvider"])
x = {"x": np.ones((1, 3, 128, 128), np.float32)}
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
for _ in range(3):
    s.run(None, x)
time.sleep(1.0)   # importing cv2 (runtime.model does) keeps two threads busy for ~0.1 s after
idle = 0.0
for _ in range(10):
    s.run(None, x)
    c = cpu()
    time.sleep(0.03)
    idle += cpu() - c
print(idle)
"""


def _idle_cpu(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: onnxruntime makes no thread pool to spin")
def test_threads_stop_spinning_when_a_call_returns():
    ours, spinning = _idle_cpu("ours"), _idle_cpu("no-stop")
    # ten sleeps of 30 ms: a spinning worker burns most of the 0.3 s, a parked one next to nothing
    assert spinning > 0.1, f"without force_spinning_stop the pool should spin after a call ({spinning:.3f} s)"
    assert ours < 0.03 and ours < spinning / 4, (ours, spinning)
