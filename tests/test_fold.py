"""export/fold.py: torch.onnx writes F.pad's list of ints as a run-time subgraph that
onnx's shape inference cannot see through; folding it gives the same numbers and static
shapes again (EfficientNet's TensorFlow-style "same" padding is one such Pad per block)."""
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to make ONNX files the PyTorch way (pip install torch)")


class SamePad(torch.nn.Module):
    """What efficientnet-lite-pytorch's Conv2dStaticSamePadding is: ZeroPad2d, then a Conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pad = torch.nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = torch.nn.Conv2d(3, 4, 3, 2)

    def forward(self, x):
        return self.conv(self.pad(x)).mean((2, 3))


def _shapes(model):
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return {vi.name: [d.dim_value or None for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}


def test_folding_the_pad_subgraph_keeps_the_numbers_and_brings_back_static_shapes():
    from explicam.export.fold import fold_constants

    buf = io.BytesIO()
    torch.onnx.export(SamePad().eval(), torch.zeros(1, 3, 15, 15), buf, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    raw = onnx.load_from_string(buf.getvalue())
    assert {"Slice", "ConstantOfShape"} <= {n.op_type for n in raw.graph.node}  # the run-time pads
    conv_out = next(n.output[0] for n in raw.graph.node if n.op_type == "Conv")
    assert None in _shapes(raw)[conv_out]  # lost after the Pad

    folded, count = fold_constants(raw)
    assert count > 0 and {n.op_type for n in folded.graph.node} == {"Constant", "Pad", "Conv", "ReduceMean"}
    assert _shapes(folded)[conv_out] == [1, 4, 7, 7]
    x = np.random.default_rng(0).random((1, 3, 15, 15), dtype=np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(folded), run(raw))
    assert fold_constants(folded)[1] == 0  # nothing left to fold
