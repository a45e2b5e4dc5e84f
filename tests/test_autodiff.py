"""explicam's ONNX reverse-mode differentiation on whole models (export/graph.py, autodiff.py).

Graphs exported by torch.onnx from torchvision architectures with seeded random weights,
whose gradients must equal torch autograd at the auto layer and at an earlier block; a
seed-like torch net (fixed-batch Reshape, softmax output) for every class at batch 1 and 8;
a Keras model through tf2onnx (NHWC) against tf.GradientTape; the one-line errors. The
rules one op at a time are in test_autodiff_ops.py.
"""
import copy
import io
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.test_autodiff_ops import _model, _session

from explicam.export import autodiff, graph, layers

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
F32 = TensorProto.FLOAT
SIZE = 64


# ---- whole models: torchvision through torch.onnx, against torch autograd --------------------

def _torch():
    return pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0, the CPU wheel)")


def _torchvision():
    torch = _torch()
    try:
        import torchvision
    except RuntimeError as exc:
        # PyPI's torchvision wheel is built against CUDA torch: beside the CPU wheel its C++
        # ops do not load, and its import then fails registering a fake kernel for
        # torchvision::nms. The architectures are plain Python; declaring the two ops'
        # schemas lets the import finish (nms itself stays unusable, and unused here).
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision.keep = lib   # the schemas live as long as the library object
        import torchvision
    return torch, torchvision


def _randomize_batchnorm(torch, model):
    """Seeded weights are the constructors'; BatchNorm's running statistics are set too, or
    folding them would be an identity and prove nothing."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _export_torch(torch, model, size, output="output"):
    buf = io.BytesIO()   # batch fixed to 1, as most published files are: the rewrite makes it dynamic
    torch.onnx.export(model, torch.rand(1, 3, *size), buf, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=[output])
    return buf.getvalue()


# name: (the module whose output the auto layer must be, an earlier block)
ARCHS = {"resnet18": ("layer4", "layer3"),
         "mobilenet_v3_small": ("features", "features.9"),
         "efficientnet_b0": ("features", "features.6"),
         "densenet121": ("features", "features.denseblock3"),   # features then F.relu(inplace): the hooked tensor
         "vgg11_bn": ("features.27", "features.20")}


@pytest.fixture(scope="session", params=sorted(ARCHS))
def torchvision_model(request):
    torch, tv = _torchvision()
    name = request.param
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None, num_classes=10)
    if name == "vgg11_bn":
        # VGG's AdaptiveAvgPool2d(7) cannot be exported from a 2x2 map (torch.onnx needs a
        # divisible size): at 64 px its head is global pooling and a small MLP instead
        model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        model.classifier = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(True), torch.nn.Dropout(),
                                               torch.nn.Linear(64, 10))
    model = _randomize_batchnorm(torch, model)
    # resnet18's output is named "logits", one of the names the new outputs take: it is renamed
    data = _export_torch(torch, model, (SIZE, SIZE), "logits" if name == "resnet18" else "output")
    new, info = autodiff.export_gradients(data)
    return name, model, data, new, info


def _torch_features_grads(torch, model, path, x, classes):
    """(hooked module output, logits, [d logits[:, c].sum() / d output for c in classes])."""
    store = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, i, o: store.setdefault("t", o))
    logits = model(torch.from_numpy(x))
    handle.remove()
    t = store["t"]
    grads = [torch.autograd.grad(logits[:, c].sum(), t, retain_graph=True)[0].numpy() for c in classes]
    return t.detach().numpy().copy(), logits.detach().numpy(), grads


def _tensor_named_by_value(data, x, value):
    """The spatial tensor of the ONNX graph that holds `value` for image x (batch 1)."""
    g = graph.prepare(data)
    names = [n for n in layers.feature_candidates(g) if g.shapes[n] == value.shape]
    m = copy.deepcopy(g.model)
    m.graph.output.extend(helper.make_tensor_value_info(n, F32, None) for n in names)
    for name, got in zip(names, _session(m).run(names, {g.input: x})):
        if np.allclose(got, value, rtol=1e-4, atol=1e-4 * np.abs(value).max()):
            return name
    raise AssertionError("no tensor of the graph holds the module's output")


def _run(new, x, target=None):
    s = _session(new)
    feeds = {s.get_inputs()[0].name: x, **({} if target is None else {"target": np.asarray(target, np.int64)})}
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _close(got, want, rel=1e-4):
    scale = np.abs(want).max()
    assert scale > 0 and np.abs(got - want).max() <= rel * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("where", ["auto", "earlier"])
def test_torchvision_grads_equal_torch_autograd(torchvision_model, where):
    torch = _torch()
    name, model, data, new, info = torchvision_model
    path = ARCHS[name][0 if where == "auto" else 1]
    x = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    classes = [0, 7]
    feats, logits, grads = _torch_features_grads(torch, model, path, x, classes)
    if where == "earlier":
        new, info = autodiff.export_gradients(data, layer=_tensor_named_by_value(data, x[:1], feats[:1]))
    for c, want in zip(classes, grads):
        out = _run(new, x, [c, c])
        # the auto layer is the expected module's output: same values (exported NHWC)
        _close(out["features"], feats.transpose(0, 2, 3, 1))
        _close(out["logits"], logits)
        _close(out["grads"], want.transpose(0, 2, 3, 1), 1e-3)
        assert out["target_used"].tolist() == [c, c]


def test_torchvision_self_check(torchvision_model):
    name, _, data, new, info = torchvision_model
    report, failures = autodiff.self_check(data, new.SerializeToString(), samples=2)
    assert not failures, report
    assert report["grads_fd"] < 1e-4, report   # every head here runs in float64 for the check
    if name == "resnet18":
        assert info["renamed"] == {"logits": "logits_original"} and info["batch_fixed"]


# ---- a seed-like torch net: fixed-batch Reshape, softmax output, every class ----------------

@pytest.fixture(scope="session")
def seed_like():
    torch = _torch()
    nn = torch.nn

    class Seed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(16 * 4 * 4, 5)

        def forward(self, x):
            x = nn.functional.max_pool2d(self.body(x), 2)
            return torch.softmax(self.fc(x.view(x.size(0), -1)), 1)   # a Reshape to the constant [1, -1]

    torch.manual_seed(1)
    model = Seed().eval()
    data = _export_torch(torch, model, (32, 32), "probs")
    new, info = autodiff.export_gradients(data)
    return model, data, new, info


@pytest.mark.parametrize("batch", [1, 8])
def test_every_class_batch_and_default_target(seed_like, batch):
    torch = _torch()
    model, data, new, info = seed_like
    assert info["activation"] == "Softmax" and info["feature_shape"] == [8, 8, 16]
    x = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
    feats = model.body(torch.from_numpy(x))
    pre = model.fc(torch.nn.functional.max_pool2d(feats, 2).reshape(batch, -1))
    for c in range(5):
        want = torch.autograd.grad(pre[:, c].sum(), feats, retain_graph=True)[0].numpy().transpose(0, 2, 3, 1)
        _close(_run(new, x, np.full(batch, c))["grads"], want, 1e-5)
    out = _run(new, x)   # no target fed: the default, top-1
    top = pre.detach().numpy().argmax(1)
    assert out["target_used"].tolist() == top.tolist()
    _close(out["probabilities"], model(torch.from_numpy(x)).detach().numpy())
    want = [torch.autograd.grad(pre[i, top[i]], feats, retain_graph=True)[0][i].numpy() for i in range(batch)]
    _close(out["grads"], np.stack(want).transpose(0, 2, 3, 1), 1e-5)
    report, failures = autodiff.self_check(data, new.SerializeToString(), samples=batch, classes=range(5))
    assert not failures, report


# ---- NHWC: a Keras model through tf2onnx, against tf.GradientTape ---------------------------

def test_keras_nhwc_against_gradient_tape():
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    tf2onnx = pytest.importorskip("tf2onnx", reason="tf2onnx is not installed")
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.SeparableConv2D(16, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu", name="conv4")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    out = keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inp, out)
    bn = model.layers[4]
    bn.set_weights([w + np.random.default_rng(0).uniform(0.1, 0.5, w.shape) for w in bn.get_weights()])
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    new, info = autodiff.export_gradients(proto.SerializeToString())
    assert info["input_layout"] == "NHWC" and info["activation"] == "Softmax"

    images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    grad_model = keras.Model(model.input, [model.get_layer("conv4").output, model.layers[-1].input])
    logits_layer = model.layers[-1]
    for c in range(4):
        with tf.GradientTape() as tape:
            feats, flat = grad_model(tf.constant(images), training=False)
            score = tf.reduce_sum(tf.matmul(flat, logits_layer.kernel)[:, c] + logits_layer.bias[c])
        want = tape.gradient(score, feats).numpy()
        out = _run(new, images, np.full(3, c))
        _close(out["features"], feats.numpy())   # the auto pick is conv4, already NHWC in the output
        _close(out["grads"], want, 1e-4)
    report, failures = autodiff.self_check(proto.SerializeToString(), new.SerializeToString())
    assert not failures, report


@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_seed_network_matches_gradient_tape_to_the_bit(head):
    """explicam's own network through tf2onnx and the ONNX differentiation: the auto layer is
    conv4 after its ReLU, and the gradient is tf.GradientTape's for every class."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    tf2onnx = pytest.importorskip("tf2onnx", reason="tf2onnx is not installed")
    import keras
    try:
        from explicam.train.model import build_model
    except ImportError:
        from train.model import build_model

    model = build_model(4, 32, 3, head)
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
    new, info = autodiff.export_gradients(tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)[0])
    assert "conv4" in info["layer"] and info["feature_shape"] == [2, 2, 256]
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    grad_model = keras.Model(model.input, [model.get_layer("conv4").output, model.output])
    for c in range(3):
        with tf.GradientTape() as tape:
            feats, logits = grad_model(tf.constant(x), training=False)
            score = tf.reduce_sum(logits[:, c])
        out = _run(new, x, np.full(4, c))
        _close(out["features"], feats.numpy(), 1e-6)
        _close(out["grads"], tape.gradient(score, feats).numpy(), 1e-6)


# ---- errors: one line each, nothing built ----------------------------------------------------

def _tiny_cnn(extra=None, outputs=1, dims=(1, 3, 16, 16), activation=None, spatial=True):
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((8, dims[1], 3, 3)) * 0.3, "fc": rng.standard_normal((8, 10)) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    last = "r"
    if extra:
        nodes.append(helper.make_node(extra, ["r"], ["e"], name="odd_one"))
        last = "e"
    if not spatial:
        nodes = []
        last = "x"
        inits["fc"] = rng.standard_normal((int(np.prod(dims[1:])), 10))
    nodes += [helper.make_node("GlobalAveragePool" if spatial else "Identity", [last], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    outs = ["y"]
    if activation:
        nodes.append(helper.make_node(activation, ["y"], ["prob"]))
        outs = ["prob"]
    if outputs == 2:
        outs.append("p")
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", F32, list(dims))],
                          [helper.make_tensor_value_info(o, F32, None) for o in outs],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_op_is_named():
    with pytest.raises(graph.GraphError, match=r"node 'odd_one' \(Sin\) .* supported: .*BatchNormalization") as err:
        autodiff.export_gradients(_tiny_cnn("Sin"))
    assert "\n" not in str(err.value)


def test_several_outputs_need_a_name():
    with pytest.raises(graph.GraphError, match=r"2 outputs \(y, p\); pass --output NAME"):
        graph.prepare(_tiny_cnn(outputs=2))
    _, info = autodiff.export_gradients(_tiny_cnn(outputs=2), output="y")
    assert info["layer"] == "r"
    with pytest.raises(graph.GraphError, match="no output named 'z'; its outputs: y, p"):
        graph.prepare(_tiny_cnn(outputs=2), output="z")


def test_dynamic_size_needs_input_size():
    model = _tiny_cnn(dims=("N", 3, "H", "W"))
    with pytest.raises(graph.GraphError, match=r"dynamic spatial size .* pass --input-size H,W"):
        graph.prepare(model)
    new, info = autodiff.export_gradients(model, input_size=(12, 20))
    assert info["feature_shape"] == [12, 20, 8]
    out = _run(new, np.random.default_rng(0).random((3, 3, 12, 20), dtype=np.float32))
    assert out["grads"].shape == (3, 12, 20, 8)
    with pytest.raises(graph.GraphError, match="does not match"):
        graph.prepare(_tiny_cnn(), input_size=(32, 32))


def test_no_spatial_layer():
    with pytest.raises(graph.GraphError, match="no tensor with spatial extent above 1"):
        autodiff.export_gradients(_tiny_cnn(spatial=False))


def test_unknown_layer_lists_candidates():
    with pytest.raises(graph.GraphError, match=r"tensor 'nope' is not in the model; spatial tensors near the output: "
                                               r"c \[1, 8, 16, 16\], r \[1, 8, 16, 16\]"):
        autodiff.export_gradients(_tiny_cnn(), layer="nope")
    _, info = autodiff.export_gradients(_tiny_cnn(), layer="c")   # before the ReLU: through the Relu rule
    assert info["layer"] == "c"


@pytest.mark.parametrize("activation", ["Softmax", "LogSoftmax", "Sigmoid"])
def test_score_is_the_pre_activation(activation):
    new, info = autodiff.export_gradients(_tiny_cnn(activation=activation))
    assert info["score"] == "y" and info["activation"] == activation
    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)   # the file's batch is 1
    out = _run(new, x)
    original = _session(_tiny_cnn(activation=activation)).run(None, {"x": x})[0]
    expected = {"Softmax": original, "LogSoftmax": np.exp(original), "Sigmoid": original}[activation]
    _close(out["probabilities"], expected)
    report, failures = autodiff.self_check(_tiny_cnn(activation=activation), new)
    assert not failures, report


def test_hard_coded_batch_is_named():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["v"], name="flatten_all"),
             helper.make_node("Unsqueeze", ["v", "zero"], ["u"]), helper.make_node("MatMul", ["u", "fc"], ["y"])]
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), "fc": rng.standard_normal((4 * 64, 5)),
             "flat": np.array([-1]), "zero": np.array([0])}
    model = _model(nodes, {"x": (1, 3, 8, 8)}, inits)
    with pytest.raises(graph.GraphError, match=r"node 'flatten_all' \(Reshape\) .* hard-codes the batch size"):
        graph.prepare(model)


def test_loading_refuses_outside_data_and_absurd_shapes(tmp_path):
    model = _tiny_cnn()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    del w.float_data[:]
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../outside.bin")
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    with pytest.raises(graph.GraphError, match="points outside the model's folder"):
        graph.load_model(str(path))
    with pytest.raises(graph.GraphError, match="refused"):
        graph.prepare(_tiny_cnn(dims=(1, 3, 100000, 100000)))
    huge = _tiny_cnn()
    huge.graph.initializer[0].dims[:] = [1 << 20, 1 << 20, 3, 3]
    with pytest.raises(graph.GraphError, match="initializer 'w' declares shape"):
        graph.load_model(huge)
    with pytest.raises(graph.GraphError, match="not an ONNX model"):
        graph.load_model(b"\x00garbage" * 10)


def test_external_data_inside_the_folder_loads(tmp_path):
    model = _tiny_cnn()
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    _, info = autodiff.export_gradients(str(tmp_path / "model.onnx"))
    assert info["layer"] == "r"
