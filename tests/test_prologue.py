"""The preprocessing the export writes in front of a graph (export/prologue.py) equals the
numpy arithmetic of runtime/preprocess.py for every layout, channel order and per-channel or
single mean and std: the graph's output is its input, so the prologue is all there is."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from explicam.export.prologue import Preprocess, add_prologue


def _identity_graph(layout: str, channels: int, hw=(5, 7)):
    from onnx import TensorProto, helper

    shape = [1, channels, *hw] if layout == "nchw" else [1, *hw, channels]
    g = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "id",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("channels, mean, std", [
    ("rgb", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), ("bgr", [103.9, 116.8, 123.7], [1.0]),
    ("rgb", [127.0], [128.0]), ("rgb", [0.0], [1.0]), ("gray", [0.5], [0.25])])
def test_the_prologue_is_the_numpy_preprocessing(layout, channels, mean, std):
    scale = 1.0 if mean[0] > 1 else 1 / 255
    pre = Preprocess(scale=scale, mean=mean, std=std, channels=channels, layout=layout)
    model = _identity_graph(layout, 1 if channels == "gray" else 3)
    add_prologue(model, "input", pre, (5, 7))
    x = np.random.default_rng(0).random((2, 5, 7, 3), dtype=np.float32)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(None, {"image": x})[0]
    rgb = x[..., ::-1] if channels == "bgr" else x
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)[:, None] if channels == "gray" else rgb
    want = (grey.astype(np.float64) * 255 * scale - np.asarray(mean)) / np.asarray(std)   # from the formula
    want = want.transpose(0, 3, 1, 2) if layout == "nchw" else want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, pre.numpy(x), rtol=1e-6, atol=1e-6)
