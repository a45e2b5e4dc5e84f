"""Input gradients written into ONNX (export --input-grads, export/input_grads.py) and the methods
built on them (runtime/methods_input.py): against torch autograd through the prologue's
mean/std and BGR Gather (tf.GradientTape: test_input_grads_keras.py), and Captum's Saliency,
GuidedBackprop, NoiseTunnel (SmoothGrad) and IntegratedGradients on the same torch network with
the same noise and baseline; batch equals one by one; numba equals numpy; the one-line error
without input gradients; guided ReLU6 against torch hooks.

Random images throughout: these gradients cross max pools, and flat image regions make windows
of values equal up to rounding, whose gradient two frameworks may send to different elements.
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
H, W = 40, 48


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(float(np.abs(want).max()), 1e-12))


def _side(path):
    return ort.InferenceSession(str(path).replace("model.onnx", "model.inputgrads.onnx"),
                                providers=["CPUExecutionProvider"])


def _images(n, seed=0, h=H, w=W):
    return np.random.default_rng(seed).random((n, h, w, 3), dtype=np.float32)


torch = pytest.importorskip("torch", reason="torch makes the PyTorch test files (pip install torch==2.13.0)")


# ---- a network of nn.ReLU modules (what Captum's guided backpropagation overrides) ----------------


class ReluNet(torch.nn.Module):
    """Stem with max pool, a residual block, a strided stage, GAP, Linear; every ReLU a module."""

    def __init__(self, classes=5):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1))
        self.after = nn.ReLU()
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        s = self.stem(x)
        f = self.stage(self.after(s + self.block(s)))
        return self.fc(f.mean((2, 3)))


class FromImage(torch.nn.Module):
    """The explicam input (N, H, W, 3) RGB [0, 1] -> the net, as the export's prologue does it."""

    def __init__(self, net, bgr=False):
        super().__init__()
        self.net, self.bgr = net, bgr

    def forward(self, x):
        v = x[..., [2, 1, 0]] if self.bgr else x
        v = (v - torch.tensor(MEAN)) / torch.tensor(STD)
        return self.net(v.permute(0, 3, 1, 2))


def _relu_net(seed=0):
    torch.manual_seed(seed)
    net = ReluNet().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net


def _export_torch(tmp, net, *, bgr=False, layer="auto", input_grads=True, name="m"):
    from explicam.export.anymodel import ExportConfig, export_any
    from explicam.export.prologue import Preprocess

    src = tmp / f"{name}.onnx"
    torch.onnx.export(net, torch.rand(1, 3, H, W), str(src), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["scores"])
    cfg = ExportConfig(model=str(src), layer=layer, out=str(tmp / name / "model.onnx"), input_grads=input_grads,
                       pre=Preprocess(mean=list(MEAN), std=list(STD), channels="bgr" if bgr else "rgb"))
    return export_any(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def torch_ig(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ig")
    net = _relu_net()
    res = _export_torch(tmp, net)
    return FromImage(net), res["onnx"]


def _torch_grad(f, x, c):
    t = torch.tensor(x, requires_grad=True)
    return torch.autograd.grad(f(t)[:, c].sum(), t)[0].numpy()


def test_torch_autograd_through_mean_std_and_bgr(torch_ig, tmp_path):
    f, path = torch_ig
    x = _images(4, 3)
    for c in range(5):
        got = _side(path).run(["input_grads"], {"image": x, "target": np.full(4, c, np.int64)})[0]
        assert _rel(got, _torch_grad(f, x, c)) < 1e-5
    net = _relu_net(1)   # the BGR prologue's Gather
    res = _export_torch(tmp_path, net, bgr=True, name="bgr")
    got = _side(res["onnx"]).run(["input_grads"], {"image": x, "target": np.full(4, 2, np.int64)})[0]
    assert _rel(got, _torch_grad(FromImage(net, bgr=True), x, 2)) < 1e-5


def _captum():
    return pytest.importorskip("captum.attr", reason="the references are Captum's (pip install captum)")


def _explainer(path, kernels="numpy"):
    from explicam.runtime.explainer import Explainer

    return Explainer(path, kernels=kernels, warmup=False)


def _u8(x):
    return np.round(x * 255).astype(np.uint8)


def test_saliency_and_guided_backprop_equal_captum(torch_ig):
    ca = _captum()
    f, path = torch_ig
    x = _u8(_images(3, 4)).astype(np.float32) / 255   # what the explainer preprocesses uint8 images to
    ex = _explainer(path)
    res = ex.explain(_u8(x), "saliency", target=1)
    want = ca.Saliency(f).attribute(torch.tensor(x), target=1, abs=False).numpy()
    assert _rel(res.cams, np.abs(want).max(-1)) < 1e-5
    guided = ca.GuidedBackprop(f).attribute(torch.tensor(x), target=1).detach().numpy()
    got = ex.model.input_gradients(x, np.full(3, 1), guided=True)["input_grads"]
    assert _rel(got, guided) < 1e-5 and not np.allclose(guided, want, atol=1e-3)
    gg = ex.explain(_u8(x), "guided-gradcam", target=1)
    grad = ex.explain(_u8(x), "gradcam", target=1)
    up = ex.upsample(grad.cams)
    assert _rel(gg.cams, np.abs(guided).max(-1) * up) < 1e-5


def test_smoothgrad_equals_captum_noise_tunnel_with_the_same_noise(torch_ig):
    ca = _captum()
    f, path = torch_ig
    x = _u8(_images(2, 5)).astype(np.float32) / 255
    samples, sigma = 6, 0.15 * float(x.max() - x.min())
    torch.manual_seed(7)
    want = ca.NoiseTunnel(ca.Saliency(f)).attribute(torch.tensor(x), nt_type="smoothgrad", nt_samples=samples,
                                                     stdevs=sigma, target=3, abs=False).numpy()
    torch.manual_seed(7)   # Captum's draw, repeated: (N * S, H, W, 3), image i's samples together
    noise = torch.normal(0, torch.tensor(sigma).repeat((2 * samples, H, W, 3))).numpy()
    res = _explainer(path).explain(_u8(x), "smoothgrad", target=3, smoothgrad_samples=samples,
                                   smoothgrad_noise_set=noise.reshape(2, samples, H, W, 3))
    assert _rel(res.cams, np.abs(want).max(-1)) < 1e-4
    # the seeded default noise: sigma = level * (max - min) of each image, the same for a batch and alone
    ex = _explainer(path)
    both = ex.explain(_u8(x), "smoothgrad", smoothgrad_samples=4).cams
    alone = np.concatenate([ex.explain(_u8(x[i:i + 1]), "smoothgrad", smoothgrad_samples=4).cams for i in range(2)])
    np.testing.assert_allclose(both, alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method,captum_method", [("midpoint", "riemann_middle"), ("right", "riemann_right"),
                                                  ("trapezoid", "riemann_trapezoid")])
def test_integrated_gradients_equal_captum_and_report_completeness(torch_ig, method, captum_method):
    ca = _captum()
    f, path = torch_ig
    x = _u8(_images(2, 6)).astype(np.float32) / 255
    steps = 16
    attr, delta = ca.IntegratedGradients(f).attribute(torch.tensor(x), baselines=torch.zeros_like(torch.tensor(x)),
                                                      target=0, n_steps=steps, method=captum_method,
                                                      return_convergence_delta=True)
    attr, delta = attr.detach().numpy().astype(np.float64), delta.detach().numpy()
    if method == "trapezoid":   # Captum weighs the steps 1/n, halved at the ends: (n-1)/n of the trapezoid rule
        attr = attr * steps / (steps - 1)
    res = _explainer(path).explain(_u8(x), "integrated-gradients", target=0, ig_steps=steps, ig_method=method,
                                   ig_baseline="black")
    assert _rel(res.cams, np.maximum(attr.sum(-1), 0)) < 1e-4
    with torch.no_grad():
        diff = (f(torch.tensor(x)) - f(torch.zeros_like(torch.tensor(x))))[:, 0].numpy()
    np.testing.assert_allclose(res.notes["ig_score_difference"], diff, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.notes["ig_sum"], attr.reshape(2, -1).sum(1), rtol=1e-4, atol=1e-5)
    if method != "trapezoid":
        np.testing.assert_allclose(res.notes["ig_delta"], delta, rtol=1e-3, atol=1e-5)
    assert (np.abs(res.notes["ig_delta"]) < 0.1 * np.abs(diff) + 1e-3).all()   # completeness, roughly, at 16 steps


def test_more_steps_close_the_completeness_gap(torch_ig):
    _, path = torch_ig
    x = _u8(_images(1, 8))
    ex = _explainer(path)
    gaps = [abs(float(ex.explain(x, "integrated-gradients", ig_steps=s, ig_baseline="blur").notes["ig_delta"][0]))
            for s in (4, 64)]
    assert gaps[1] < gaps[0]


@pytest.mark.parametrize("method", ["saliency", "integrated-gradients", "guided-gradcam"])
def test_batch_equals_one_by_one_and_numba_equals_numpy(torch_ig, method):
    _, path = torch_ig
    x = _u8(_images(3, 9))
    opts = {"ig_steps": 4, "ig_baseline": "noise"}
    numpy_ex, numba_ex = _explainer(path, "numpy"), _explainer(path, "numba")
    both = numpy_ex.explain(x, method, **opts)
    alone = [numpy_ex.explain(x[i:i + 1], method, **opts) for i in range(3)]
    np.testing.assert_allclose(both.cams, np.concatenate([a.cams for a in alone]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(numba_ex.explain(x, method, **opts).heatmaps, both.heatmaps, atol=1e-5)
    assert both.heatmaps.shape == (3, H, W) and both.cams.shape == (3, H, W)


def test_without_input_grads_the_methods_say_how_to_get_them(tmp_path):
    from explicam.evaluate.evaluate import default_methods
    from explicam.runtime.methods import MethodError

    res = _export_torch(tmp_path, _relu_net(), input_grads=False, name="plain")
    ex = _explainer(res["onnx"])
    for method in ("saliency", "smoothgrad", "integrated-gradients", "guided-gradcam"):
        with pytest.raises(MethodError, match="re-export the model with --input-grads"):
            ex.explain(_u8(_images(1)), method)
    assert not ex.model.has_input_grads and "saliency" not in default_methods("gap", False)
    with pytest.raises(Exception, match="input gradients"):
        _explainer_with(res["onnx"], placement="effective")


def _explainer_with(path, **kw):
    from explicam.runtime.explainer import Explainer

    return Explainer(path, warmup=False, **kw)


def test_the_side_file_is_checked_and_guided_relu6_is_rectified():
    """The export's finite-difference check; Clip from 0 (ReLU6) takes the guided rule too."""
    import io

    from explicam.export.autodiff import export_gradients
    from explicam.export.input_grads import build_side_files
    from explicam.export.prologue import Preprocess, add_prologue

    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, 1, 1), torch.nn.ReLU6(), torch.nn.Conv2d(6, 6, 3, 2, 1),
                              torch.nn.ReLU6(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(6, 3)).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, torch.rand(1, 3, 16, 16), buf, dynamo=False, opset_version=17, input_names=["input"])
    main, _ = export_gradients(buf.getvalue())
    add_prologue(main, "input", Preprocess(layout="nchw"), (16, 16))
    side, guided_side, report = build_side_files(main, log=lambda *a: None)
    assert report["input_grads_fd"] < 1e-4 and report["guided_logits"] < 1e-5
    x = _images(2, 10, 16, 16) * 3   # values past 6 after the convolutions are likely: both kinks in play
    s, sg = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (side, guided_side))
    plain, guided = (f.run(["input_grads"], {"image": x})[0] for f in (s, sg))
    # the reference: torch with every ReLU6's backward passing only positive gradients
    handles = [m.register_full_backward_hook(lambda m, gi, go: (torch.clamp(gi[0], min=0),))
               for m in net if isinstance(m, torch.nn.ReLU6)]
    f = lambda t: net(t.permute(0, 3, 1, 2))  # noqa: E731
    want = _torch_grad(f, x, 0)
    for h in handles:
        h.remove()
    got = sg.run(["input_grads"], {"image": x, "target": np.zeros(2, np.int64)})[0]
    assert _rel(got, want) < 1e-5 and not np.allclose(plain, guided)
    assert onnx.checker.check_model(side) is None and onnx.checker.check_model(guided_side) is None
    assert {i.name for i in side.graph.input} == {"image", "target"}   # no switch left in either walk


def test_an_export_from_before_with_the_guided_switch_still_explains(torch_ig, tmp_path):
    """Exports made before 2026-12 hold one side file whose `guided` input switches the walk:
    the runtime feeds it when the file asks for it, and takes it from there for guided-gradcam."""
    import json
    import shutil

    from explicam.runtime.model import OnnxModel

    src = os.path.dirname(str(torch_ig[1]))
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    main = onnx.load(tmp_path / "model.onnx")
    keep = [p for p in main.metadata_props if p.key != "guided_grads_file"]   # the old metadata named one file
    del main.metadata_props[:]
    main.metadata_props.extend(keep)
    meta = {p.key: p.value for p in keep}
    onnx.save(main, tmp_path / "model.onnx")
    os.remove(tmp_path / "model.guidedgrads.onnx")
    # the old file's contract, by hand: input_grads = image, doubled when guided = [True]
    classes = len(json.loads(meta["class_names"]))
    f32 = onnx.TensorProto.FLOAT
    nodes = [helper.make_node("Where", ["guided", "two", "one"], ["k"]), helper.make_node("Mul", ["image", "k"], ["input_grads"]),
             helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["target_used"], axis=1, keepdims=0)]
    g = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("image", f32, ["N", H, W, 3]),
                                         helper.make_tensor_value_info("target", onnx.TensorProto.INT64, ["N"]),
                                         helper.make_tensor_value_info("guided", onnx.TensorProto.BOOL, [1])],
                          [helper.make_tensor_value_info(n, f32, None) for n in ("input_grads", "logits", "probabilities")]
                          + [helper.make_tensor_value_info("target_used", onnx.TensorProto.INT64, None)],
                          [numpy_helper.from_array(np.array([False]), "guided"), numpy_helper.from_array(np.array([-1]), "target"),
                           numpy_helper.from_array(np.float32([2.0]), "two"), numpy_helper.from_array(np.float32([1.0]), "one"),
                           numpy_helper.from_array(np.ones((3, classes), np.float32), "w")])
    old = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(old, {"export_id": meta["export_id"]})
    onnx.save(old, tmp_path / "model.inputgrads.onnx")
    model = OnnxModel(str(tmp_path / "model.onnx"))
    x = _images(2)
    assert np.array_equal(model.input_gradients(x, [0, 1])["input_grads"], x)
    assert np.array_equal(model.input_gradients(x, [0, 1], guided=True)["input_grads"], 2 * x)


def test_bench_times_the_per_sample_rows_apart_on_a_few_images(torch_ig, monkeypatch):
    """SmoothGrad's and IG's "per sample (x saliency)" rows: each method beside saliency on the
    batch's first PER_SAMPLE_IMAGES images (1 at batch 1), not inside the batch's long rounds."""
    from explicam.runtime import bench
    from explicam.runtime.explainer import Explainer

    calls = []
    explain = Explainer.explain

    def spy(self, images, method="gradcam", target=None, **kw):
        calls.append((method, len(images), kw.get("smoothgrad_samples", kw.get("ig_steps"))))
        if kw.get("input_grads_pipelines"):
            calls.append((method, len(images), "pipelines", kw["input_grads_pipelines"]))
        return explain(self, images, method, target, **kw)

    monkeypatch.setattr(Explainer, "explain", spy)
    res = bench.run_bench(str(torch_ig[1]), methods=["saliency", "smoothgrad", "integrated-gradients"],
                          batches=(1, 6), min_seconds=0.01, log=lambda *_: None, threads=2)
    rows = {(r["name"], r["batch"]): r for r in res["rows"]}
    # saliency at batch 6 again on one session, beside the pipelines; at batch 1 there is one call either way
    assert rows[(bench.ONE_SESSION, 6)]["ms_per_image"] > 0 and (bench.ONE_SESSION, 1) not in rows
    assert ("saliency", 6, "pipelines", 1) in calls and "2 one-thread pipelines" in res["settings"]["onnxruntime"]
    for batch, n in ((1, 1), (6, bench.PER_SAMPLE_IMAGES)):
        for m in ("smoothgrad", "integrated-gradients"):
            r = rows[(f"{m}, per sample (x saliency)", batch)]
            assert r["ms_per_image"] > 0 and r["ratio"] > 0
            assert (m, n, bench.GRAD_SAMPLES) in calls   # the per-sample rounds' calls
            assert (m, batch, bench.GRAD_SAMPLES) in calls   # and the batch's own row
        assert ("saliency", n, None) in calls


def test_smoothgrad_and_ig_hold_one_calls_samples_at_a_time(torch_ig):
    """An image's samples go through the gradient file a round of calls at a time (one call per
    pipeline): numpy's peak stays under what all 40 noisy copies of the image would take (the
    code before held them, their gradients and a float64 copy: several times that), and the
    maps equal the run's in calls of as many samples as the pixel budget takes."""
    import tracemalloc

    ex = _explainer(torch_ig[1])
    img = _u8(_images(1, 8))
    one_copy = _images(1).nbytes
    for method, kw in (("smoothgrad", {"smoothgrad_samples": 40}), ("integrated-gradients", {"ig_steps": 40})):
        whole = ex.explain(img, method, target=1, **kw)   # 40 x 40x48 px: calls of 26 (PIPELINE_PIXELS)
        tracemalloc.start()
        calls = ex.explain(img, method, target=1, input_grads_batch=2, **kw)   # twenty calls of 2
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 40 * one_copy / 2, (method, peak, one_copy)
        np.testing.assert_allclose(calls.cams, whole.cams, rtol=1e-5, atol=1e-6 * float(np.abs(whole.cams).max()))


def test_pipelines_give_what_one_session_gives(torch_ig):
    """Calls of an input-gradient batch run as one-thread pipelines on a session of their own
    where the explainer may use two threads or more; every method's maps, logits and targets
    equal those of a one-thread explainer that runs the same calls one after another."""
    import threading

    x = _u8(_images(5, 3))
    piped, alone = _explainer_with(torch_ig[1], threads=2), _explainer_with(torch_ig[1], threads=1)
    seen = set()
    real = piped.model.input_gradients

    def spy(*args, **kw):
        seen.add((threading.get_ident(), kw.get("threads")))
        return real(*args, **kw)

    piped.model.input_gradients = spy
    for method, kw in (("saliency", {}), ("smoothgrad", {"smoothgrad_samples": 6}), ("integrated-gradients", {"ig_steps": 6}),
                       ("guided-gradcam", {})):
        a = piped.explain(x, method, target=[0, 1, 2, 1, 0], input_grads_batch=1, **kw)
        b = alone.explain(x, method, target=[0, 1, 2, 1, 0], input_grads_batch=1, **kw)
        np.testing.assert_allclose(a.cams, b.cams, rtol=1e-5, atol=1e-6 * float(np.abs(b.cams).max()), err_msg=method)
        np.testing.assert_array_equal(a.targets, b.targets)
    assert {t for _, t in seen} == {1} and threading.get_ident() not in {i for i, _ in seen}
    seen.clear()   # input_grads_pipelines=1: every call on the explainer's own session, in this thread
    one = piped.explain(x, "saliency", target=[0, 1, 2, 1, 0], input_grads_batch=1, input_grads_pipelines=1)
    assert seen == {(threading.get_ident(), None)}
    np.testing.assert_allclose(one.cams, alone.explain(x, "saliency", target=[0, 1, 2, 1, 0]).cams, rtol=1e-5,
                               atol=1e-6 * max(1.0, float(np.abs(one.cams).max())))
    with pytest.raises(ValueError, match="input_grads_pipelines"):
        piped.explain(x, "saliency", input_grads_pipelines=0)
