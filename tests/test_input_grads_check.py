"""The export's finite-difference check of the input gradients (export/input_grads.py,
check_input_grads, and export/autodiff_check._fd_error): a ReLU kink beside the point must
not refuse an exact gradient, and a wrong gradient must still be refused. Against torch
autograd in float64."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch", reason="torch makes the PyTorch test files (pip install torch==2.13.0)")


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(float(np.abs(want).max()), 1e-12))


def _torch_grad(f, x, c):
    t = torch.tensor(x, requires_grad=True)
    return torch.autograd.grad(f(t)[:, c].sum(), t)[0].numpy()


def test_the_finite_difference_check_takes_kinks_beside_the_point_and_still_catches_errors():
    """A ReLU input 6e-8 from zero over a flat patch, and one 9e-10 from zero at a single pixel,
    bend every central difference the check used to take (steps 1e-6 and 1e-7 of the rms value;
    the 2-epoch seed net of 2026-12-02 was refused so, its gradient equal to tf.GradientTape's
    to 3e-7). The check passes the exact gradient and refuses one 1% off."""
    import io

    from explicam.export.autodiff import export_gradients
    from explicam.export.input_grads import check_input_grads, input_grads_model
    from explicam.export.onnx import classifier_only
    from explicam.export.prologue import Preprocess, add_prologue

    torch.manual_seed(4)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = np.random.default_rng(7).random((1, 16, 16, 3), dtype=np.float32)
    x[0, 2:10, 2:10] = 0.5            # channel 0 sums this patch to exactly 0 ...
    x[0, 12, 12] = (0.25, 0.5, 0.75)  # ... and channel 1 this pixel
    with torch.no_grad():
        net[0].weight[:2, :, 0, 0] = torch.tensor([[0.5, 0.25, -0.75], [1.0, 1.0, -1.0]])
        net[0].bias[:2] = torch.tensor([2.0 ** -24, 2.0 ** -30])   # the kinks' distances, exact in float32
    buf = io.BytesIO()
    torch.onnx.export(net, torch.rand(1, 3, 16, 16), buf, dynamo=False, opset_version=17, input_names=["input"])
    main, _ = export_gradients(buf.getvalue())
    add_prologue(main, "input", Preprocess(layout="nchw"), (16, 16))
    side = input_grads_model(classifier_only(main, features=False))
    s = ort.InferenceSession(side.SerializeToString(), providers=["CPUExecutionProvider"])
    f = lambda t: net.double()(t.permute(0, 3, 1, 2))  # noqa: E731
    want = _torch_grad(f, x.astype(np.float64), 0)
    assert _rel(s.run(["input_grads"], {"image": x, "target": np.zeros(1, np.int64)})[0], want) < 1e-5
    # the premise: central differences at every step the check takes are bent by more than its tolerance
    v = np.random.default_rng(0).standard_normal(x.shape)
    rms = float(np.sqrt((x.astype(np.float64) ** 2).mean()))
    for rel in (1e-6, 1e-7, 1e-8):
        h = rel * rms / float(np.sqrt((v ** 2).mean()))
        with torch.no_grad():
            fd = (f(torch.tensor(x + h * v))[0, 0] - f(torch.tensor(x - h * v))[0, 0]).item() / (2 * h)
        assert abs(fd - (want * v).sum()) > 1e-4 * abs((want * v).sum())
    report, bad = check_input_grads(side, images=x, classes=[0, 2])
    assert not bad and report["input_grads_fd"] < 1e-5
    out = side.graph.output[[o.name for o in side.graph.output].index("input_grads")]
    off = onnx.ModelProto.FromString(side.SerializeToString())
    for node in off.graph.node:   # the same file, its gradient 1% off
        node.output[:] = ["input_grads_exact" if o == out.name else o for o in node.output]
    off.graph.initializer.append(numpy_helper.from_array(np.array(1.01, np.float32), "one_percent"))
    off.graph.node.append(helper.make_node("Mul", ["input_grads_exact", "one_percent"], [out.name]))
    report, bad = check_input_grads(off, images=x, classes=[0, 2])
    assert bad and "input_grads_fd" in bad[0] and report["input_grads_fd"] > 1e-3
