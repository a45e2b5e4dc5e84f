"""Whole torch models through explicam's ONNX differentiation with the ops of
export/autodiff_extra.py on the path from the feature layer to the score (F.interpolate,
InstanceNorm, LayerNorm, amax, maximum, einsum), against torch autograd; and a torch head
that reads its batch size from the image (`n = x.size(0)` ... `view(n, -1)`), exported
with a dynamic batch, which still gets its head file."""
import numpy as np
import pytest

from tests.test_autodiff import _close, _export_torch, _run, _tensor_named_by_value, _torch, _torch_features_grads

try:
    from explicam.export import autodiff
except ImportError:
    from export import autodiff


def _upsampling_net(torch):
    nn, F = torch.nn, torch.nn.functional

    class UpNet(nn.Module):
        """Features at 1/2 size, then a decoder-like head: upsampled x2 (bilinear) and again
        to a fixed size (nearest), InstanceNorm, LayerNorm over (C, H, W), a leaky maximum,
        the spatial amax and mean, and an einsum classifier."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
            self.conv = nn.Conv2d(8, 6, 3, 1, 1)
            self.inorm = nn.InstanceNorm2d(6, affine=True)
            self.ln = nn.LayerNorm([6, 20, 20])
            self.w = nn.Parameter(torch.randn(5, 12) * 0.3)

        def forward(self, x):
            f = self.body(x)                                                    # (N, 8, 16, 16)
            h = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)
            h = self.inorm(self.conv(h))
            h = self.ln(F.interpolate(h, size=(20, 20), mode="nearest"))
            h = torch.maximum(h, 0.2 * h)
            pooled = torch.cat([torch.amax(h, dim=(2, 3)), h.mean((2, 3))], 1)  # (N, 12)
            return torch.einsum("nc,kc->nk", pooled, self.w)

    torch.manual_seed(3)
    net = UpNet().eval()
    with torch.no_grad():
        for m in (net.inorm, net.ln):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    return net


def test_upsampling_and_normalising_head_equals_torch_autograd():
    torch = _torch()
    net = _upsampling_net(torch)
    data = _export_torch(torch, net, (32, 32))
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    classes = [0, 2, 4]
    feats, logits, grads = _torch_features_grads(torch, net, "body", x, classes)
    layer = _tensor_named_by_value(data, x[:1], feats[:1])
    new, info = autodiff.export_gradients(data, layer=layer)
    ops = {n.op_type for n in new.graph.node}
    assert {"Resize", "InstanceNormalization", "LayerNormalization", "Max", "ReduceMax", "Einsum"} <= ops, ops
    for c, want in zip(classes, grads):
        out = _run(new, x, [c] * len(x))
        _close(out["logits"], logits)
        _close(out["features"], feats.transpose(0, 2, 3, 1))
        _close(out["grads"], want.transpose(0, 2, 3, 1), 1e-4)
    report, failures = autodiff.self_check(data, new.SerializeToString(), samples=2)
    assert not failures, report
    assert report["grads_fd"] < 1e-4, report   # the head ran in float64 (Resize, InstanceNorm rewritten)


# ---- the batch size read from the image: the head file is still written ----------------------

def _batch_from_image_net(torch, shape_of):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8 * 8 * 8, 4)

        def forward(self, x):
            n = x.size(0)   # the image's batch: Shape(input) -> Gather 0 in the graph
            f = nn.functional.max_pool2d(self.body(x), 2)
            return self.fc(f.view(n if shape_of == "image" else f.size(0), -1))

    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("shape_of", ["image", "pooled"])
def test_a_head_that_reads_the_batch_from_the_image_gets_its_head_file(tmp_path, shape_of):
    import onnxruntime as ort

    from explicam import Explainer
    from tests.test_anymodel_keras import _export, _meta

    torch = _torch()
    net = _batch_from_image_net(torch, shape_of)
    src = tmp_path / "dyn.onnx"
    torch.onnx.export(net, torch.rand(1, 3, 32, 32), str(src), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["scores"],
                      dynamic_axes={"input": {0: "n"}, "scores": {0: "n"}})
    path, _ = _export(tmp_path, src)
    meta = _meta(path)
    assert meta["head_file"], meta
    head_path = path.parent / meta["head_file"]
    assert head_path.is_file()
    main = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in head.get_inputs()] == ["features"]
    x = np.random.default_rng(1).random((5, 32, 32, 3), dtype=np.float32)
    feats, logits = main.run(["features", "logits"], {"image": x})
    np.testing.assert_allclose(head.run(["logits"], {"features": feats})[0], logits, rtol=1e-5, atol=1e-6)
    ex = Explainer(path)
    photo = np.random.default_rng(2).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    for method in ("ablationcam", "reciprocam"):
        res = ex.explain(photo, method)
        assert res.cams.shape == (1, 16, 16) and np.isfinite(res.heatmaps).all(), method
