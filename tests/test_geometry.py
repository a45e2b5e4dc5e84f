"""Receptive-field geometry (export/geometry.py), the placed upsampling kernel
(camkernels.upsample_placed) and the runtime's placements, each against an independent
expectation: where a bright pixel really is, hand-derived offsets, a slow loop."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from explicam import camkernels as ck
from explicam.camkernels import kernels as K
from explicam.export.geometry import GeometryError, feature_geometry, naive_geometry, placement_params

BACKENDS = ["numpy"] + ([] if K.NUMBA_ERROR else ["numba"])
S = 32  # input side of the one-layer networks


# --- a one-layer explicam-like network: NHWC image -> Conv (delta kernel) -> ReLU -> features, plus a head
def one_layer(k, stride, pads, tap, size=S):
    """pads: "SAME_UPPER" / "SAME_LOWER" / "VALID" (auto_pad) or (begin, end) explicit pads."""
    w = np.zeros((1, 3, k, k), np.float32)
    w[0, :, tap, tap] = 1.0  # output cell j copies input pixel stride * j - pad_begin + tap
    conv = dict(kernel_shape=[k, k], strides=[stride, stride])
    if isinstance(pads, str):
        conv["auto_pad"] = pads
    else:
        conv["pads"] = [pads[0], pads[0], pads[1], pads[1]]
    nodes = [helper.make_node("Transpose", ["image"], ["x"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["x", "w"], ["c"], **conv),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Transpose", ["r"], ["features"], perm=[0, 2, 3, 1]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["logits"])]
    graph = helper.make_graph(
        nodes, "one_layer", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def peak(heat):
    """Mean (y, x) of the pixels holding the maximum (a tie of two pixels: their midpoint)."""
    ys, xs = np.nonzero(heat == heat.max())
    return ys.mean(), xs.mean()


def pad_begin(k, stride, pads, size=S):
    """TensorFlow / ONNX SAME, written out independently: out = ceil(n / s), the total pad
    what the last window needs, the odd one after (UPPER) or before (LOWER)."""
    if not isinstance(pads, str):
        return pads[0]
    if pads == "VALID":
        return 0
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    return total // 2 if pads == "SAME_UPPER" else total - total // 2


CASES = [(k, s, p, tap) for k in (3, 4) for s in (1, 2)
         for p in ("SAME_UPPER", "SAME_LOWER", "VALID", (1, 1), (1, 2), (0, 0))
         for tap in ({3: (1,), 4: (1, 2)}[k])]


@pytest.mark.parametrize("k,stride,pads,tap", CASES)
def test_bright_pixel_lands_on_itself(k, stride, pads, tap):
    model = one_layer(k, stride, pads, tap)
    geo = feature_geometry(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pb = pad_begin(k, stride, pads)
    for j in (2, 4):  # interior cells, both axes at once (row cell j, column cell j + 1)
        py, px = stride * j - pb + tap, stride * (j + 1) - pb + tap
        img = np.zeros((1, S, S, 3), np.float32)
        img[0, py, px] = 1.0
        feats = session.run(["features"], {"image": img})[0][..., 0]
        h, w = feats.shape[1:]
        assert np.argwhere(feats[0] > 0).tolist() == [[j, j + 1]]  # the delta kernel moved the pixel there
        assert geo["feature_size"] == [h, w] and geo["stride"] == [stride, stride]
        assert geo["rf"] == [k, k]
        got = peak(ck.upsample_placed(feats, S, S, *placement_params(geo))[0])
        # the receptive field's centre is the kernel's central tap: a central delta lands within
        # half a pixel (exactly on it for odd k), and the offset is the centre of the window
        assert got == pytest.approx((py + (k - 1) / 2 - tap, px + (k - 1) / 2 - tap), abs=1e-9)
        assert abs(got[0] - py) <= 0.5 and abs(got[1] - px) <= 0.5
        assert geo["offset"][0] == pytest.approx((k - 1) / 2 - pb)
        # naive: the cell drawn at (j + 0.5) * S / h - 0.5, off by what that formula predicts
        naive = peak(ck.upsample_bilinear(feats, S, S)[0])
        want = ((j + 0.5) * S / h - 0.5, (j + 1.5) * S / w - 0.5)
        assert abs(naive[0] - want[0]) <= 0.5 and abs(naive[1] - want[1]) <= 0.5
        ng = naive_geometry((S, S), (h, w))
        shift = ng["stride"][0] * j + ng["offset"][0] - (geo["stride"][0] * j + geo["offset"][0])
        assert abs((naive[0] - got[0]) - shift) <= 0.5


def test_even_same_kernel_shifts_half_a_pixel_only_when_its_pad_is_odd():
    """The seed's defect in one layer: k=4, stride 1, SAME_UPPER pads 1 before and 2 after, so
    output j is centred at j - 1 + 1.5 = j + 0.5, where the naive stretch (offset 0) draws it at j.
    At stride 2 the same kernel pads 1 and 1 at 32 px: 2 j + 0.5, which is the naive place too."""
    geo = feature_geometry(one_layer(4, 1, "SAME_UPPER", 1))
    assert geo["offset"] == [0.5, 0.5] and geo["stride"] == [1.0, 1.0]
    assert naive_geometry((S, S), (S, S))["offset"] == [0.0, 0.0]
    geo2 = feature_geometry(one_layer(4, 2, "SAME_UPPER", 1))
    assert geo2["offset"] == [0.5, 0.5] == naive_geometry((S, S), (16, 16))["offset"]
    assert feature_geometry(one_layer(4, 1, "SAME_LOWER", 1))["offset"] == [-0.5, -0.5]


# --- the seed network: 15.5 px at every size ------------------------------------------------------
@pytest.mark.parametrize("size", [64, 128, 224])
def test_seed_network_offset_is_15_5_px(size):
    pytest.importorskip("tensorflow", reason="the seed network is built with Keras (the [train] extra)")
    from explicam.export.geometry import geometry_from_keras
    from explicam.export.onnx import build_onnx
    from explicam.evaluate.report import receptive_field
    from explicam.train.model import build_model

    kernel = 4 if size != 128 else 2
    model = build_model(kernel=kernel, input_size=size, num_classes=3)
    main, _ = build_onnx(model, "conv4")
    geo = feature_geometry(main)
    h = size // 16
    assert geo["feature_size"] == [h, h] and geo["stride"] == [16.0, 16.0]
    # by hand: each stride-1 'same' conv with an even kernel pads K/2 - 1 before, so its output
    # j is centred at j + 0.5; each 2x2/2 pool at 2 j + 0.5; composed over conv0..conv4:
    # 0.5 + 1 * (0.5) + 2 * (0.5 + 0.5) + 4 * (0.5 + 0.5) + 8 * (0.5 + 0.5) + 16 * 0.5 = 23
    assert geo["offset"] == [23.0, 23.0]
    naive = naive_geometry((size, size), (h, h))
    assert naive["offset"] == [7.5, 7.5]
    assert [g - n for g, n in zip(geo["offset"], naive["offset"])] == [15.5, 15.5]
    assert geo["rf"] == [receptive_field(kernel)] * 2 == [31 * kernel - 15] * 2
    keras_geo = geometry_from_keras(model, "conv4")
    for key in ("stride", "offset", "rf", "feature_size"):
        assert keras_geo[key] == geo[key], key
    assert feature_geometry(main)["feature_axes"] == [1, 2]  # NHWC features behind tf2onnx's Transposes


def test_odd_seed_kernel_has_no_shift():
    pytest.importorskip("tensorflow", reason="the seed network is built with Keras (the [train] extra)")
    from explicam.export.geometry import geometry_from_keras
    from explicam.train.model import build_model

    geo = geometry_from_keras(build_model(kernel=3, input_size=64, num_classes=3), "conv4")
    assert geo["offset"] == [7.5, 7.5] == naive_geometry((64, 64), (4, 4))["offset"]


# --- ResNet-18 (odd kernels, symmetric pads, residual branches) ---------------------------------------
def resnet18_graph(size=224, width=4):
    """ResNet-18's geometry-relevant graph, NCHW, with narrow random weights: conv 7x7/2 p3,
    BN, ReLU, maxpool 3x3/2 p1, four stages of two basic blocks (3x3 convs p1; the first
    conv of stages 2-4 has stride 2 and a 1x1/2 downsample branch), Add, ReLU, then a head."""
    rng = np.random.default_rng(0)
    inits, nodes, n = [], [], [0]

    def conv(x, k, s, p):
        n[0] += 1
        name = f"w{n[0]}"
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width if n[0] > 1 else 3, k, k))
                                             .astype(np.float32) * 0.1, name))
        out = f"c{n[0]}"
        nodes.append(helper.make_node("Conv", [x, name], [out], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4))
        bn = [f"bn{n[0]}_{i}" for i in range(4)]
        for b, v in zip(bn, (1.0, 0.0, 0.0, 1.0)):
            inits.append(numpy_helper.from_array(np.full(width, v, np.float32), b))
        nodes.append(helper.make_node("BatchNormalization", [out] + bn, [out + "bn"]))
        return out + "bn"

    def relu(x):
        nodes.append(helper.make_node("Relu", [x], [x + "r"]))
        return x + "r"

    x = relu(conv("image", 7, 2, 3))
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x = "pool"
    for stage in range(4):
        for block in range(2):
            s = 2 if stage > 0 and block == 0 else 1
            y = conv(relu(conv(x, 3, s, 1)), 3, 1, 1)
            skip = conv(x, 1, 2, 0) if s == 2 else x
            nodes.append(helper.make_node("Add", [y, skip], [y + "add"]))
            x = relu(y + "add")
    nodes.append(helper.make_node("Transpose", [x], ["features"], perm=[0, 2, 3, 1]))
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["logits"]))
    graph = helper.make_graph(nodes, "resnet18_geometry",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# By hand, per axis (centre of output j in the layer's input units = s j - p + (k - 1) / 2;
# rf += (k - 1) * jump; jump *= s):
#   conv1 7x7/2 p3:    centre 2 j - 3 + 3 = 2 j           rf 7,                 jump 2
#   maxpool 3x3/2 p1:  2 (2 j - 1 + 1) = 4 j              rf 7 + 2 * 2 = 11,     jump 4
#   layer1, 4 x 3x3/1 p1 (centre unchanged):               rf 11 + 4 * 2 * 4 = 43
#   layer2 3x3/2 p1:   4 (2 j - 1 + 1) = 8 j              rf 43 + 2 * 4 = 51,    jump 8
#     then 3 x 3x3/1:                                      rf 51 + 3 * 2 * 8 = 99
#     downsample 1x1/2 p0: 4 (2 j) = 8 j: the branches agree
#   layer3: 16 j, rf 99 + 2 * 8 + 3 * 2 * 16 = 211;  layer4: 32 j, rf 211 + 2 * 16 + 3 * 2 * 32 = 435
# So cell j looks at 32 j (offset 0), receptive field 435 px; the naive stretch of the 7x7 map
# over 224 px draws it at 32 j + 15.5.
def test_resnet18_geometry_by_hand():
    model = resnet18_graph()
    geo = feature_geometry(model)
    assert geo["stride"] == [32.0, 32.0] and geo["offset"] == [0.0, 0.0] and geo["rf"] == [435, 435]
    assert geo["feature_size"] == [7, 7] and geo["notes"] == []
    assert naive_geometry((224, 224), (7, 7))["offset"] == [15.5, 15.5]
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["features"], {"image": np.zeros((1, 3, 224, 224), np.float32)})[0]
    assert out.shape == (1, 7, 7, 4)  # the graph is a real, runnable network of that shape


def test_torchvision_resnet18_geometry(tmp_path):
    from tests.test_autodiff import _torchvision  # skips when torch or torchvision is absent

    torch, torchvision = _torchvision()
    body = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]).eval()
    path = tmp_path / "r18.onnx"
    torch.onnx.export(body, torch.zeros(1, 3, 224, 224), str(path), input_names=["image"],
                      output_names=["features"], opset_version=17, dynamo=False)
    geo = feature_geometry(onnx.load(str(path)))
    assert geo["stride"] == [32.0, 32.0] and geo["offset"] == [0.0, 0.0] and geo["rf"] == [435, 435]


# --- branches and refusals -----------------------------------------------------------------------
def _graph(nodes, inits, size=16):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                         [1, 1, size, size])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_of_branches_that_agree_takes_the_largest_field():
    w1, w3 = np.ones((1, 1, 1, 1), np.float32), np.ones((1, 1, 3, 3), np.float32)
    model = _graph([helper.make_node("Conv", ["image", "w1"], ["a"], kernel_shape=[1, 1]),
                    helper.make_node("Conv", ["image", "w3"], ["b"], kernel_shape=[3, 3], pads=[1] * 4),
                    helper.make_node("Concat", ["a", "b"], ["features"], axis=1)], {"w1": w1, "w3": w3})
    geo = feature_geometry(model)
    assert geo["rf"] == [3, 3] and geo["offset"] == [0.0, 0.0] and geo["notes"] == []


def test_disagreeing_branches_take_the_largest_field_and_say_so():
    w2, w4 = np.ones((1, 1, 2, 2), np.float32), np.ones((1, 1, 4, 4), np.float32)
    model = _graph([helper.make_node("Conv", ["image", "w2"], ["a"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
                    helper.make_node("Conv", ["image", "w4"], ["b"], kernel_shape=[4, 4], pads=[2, 2, 1, 1]),
                    helper.make_node("Add", ["a", "b"], ["features"])], {"w2": w2, "w4": w4})
    geo = feature_geometry(model)
    assert geo["rf"] == [4, 4] and geo["offset"] == [-0.5, -0.5] and len(geo["notes"]) == 1


def test_squeeze_excitation_gate_is_ignored_and_unknown_ops_refused():
    w3 = np.ones((1, 1, 3, 3), np.float32)
    se = _graph([helper.make_node("Conv", ["image", "w3"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
                 helper.make_node("GlobalAveragePool", ["a"], ["g"]),
                 helper.make_node("Sigmoid", ["g"], ["gs"]),
                 helper.make_node("Mul", ["a", "gs"], ["features"])], {"w3": w3})
    assert feature_geometry(se)["stride"] == [2.0, 2.0]
    up = _graph([helper.make_node("ConvTranspose", ["image", "w3"], ["features"], kernel_shape=[3, 3])], {"w3": w3})
    with pytest.raises(GeometryError, match="ConvTranspose"):
        feature_geometry(up)


# --- the kernel: numba == numpy == a slow loop; naive == upsample_bilinear; batch == one by one ----
def placed_loop(maps, out_h, out_w, sy, oy, sx, ox):
    """Bilinear at fractional cell (p - offset) / stride, edges held, in float64."""
    n, h, w = maps.shape
    out = np.empty((n, out_h, out_w))
    for p in range(out_h):
        u = min(max((p - oy) / sy, 0.0), h - 1.0)
        i0 = int(np.floor(u))
        i1, fy = min(i0 + 1, h - 1), u - i0
        for q in range(out_w):
            v = min(max((q - ox) / sx, 0.0), w - 1.0)
            j0 = int(np.floor(v))
            j1, fx = min(j0 + 1, w - 1), v - j0
            top = maps[:, i0, j0] * (1 - fx) + maps[:, i0, j1] * fx
            bottom = maps[:, i1, j0] * (1 - fx) + maps[:, i1, j1] * fx
            out[:, p, q] = top * (1 - fy) + bottom * fy
    return out


PARAMS = [((8, 8), (128, 128), (16, 23, 16, 23)), ((7, 7), (224, 224), (32, 0, 32, 0)),
          ((5, 9), (37, 61), (7.3, -2.25, 6.5, 3.0)), ((4, 4), (64, 64), (16, 23, 16, 23)),
          ((1, 6), (4, 9), (3, 1, 1.5, 0.25)), ((16, 12), (8, 6), (0.5, -0.25, 0.5, -0.25))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src,dst,p", PARAMS)
def test_placed_matches_loop_and_batch_equals_one_by_one(backend, src, dst, p):
    maps = np.random.default_rng(3).standard_normal((4,) + src).astype(np.float32)
    got = ck.get(backend).upsample_placed(maps, *dst, *p)
    ref = placed_loop(maps.astype(np.float64), *dst, *p)
    assert got.dtype == np.float32 and got.shape == (4,) + dst
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    one_by_one = np.concatenate([ck.get(backend).upsample_placed(m[None], *dst, *p) for m in maps])
    assert np.array_equal(got, one_by_one)


@pytest.mark.skipif(bool(K.NUMBA_ERROR), reason=f"numba unavailable: {K.NUMBA_ERROR}")
@pytest.mark.parametrize("src,dst,p", PARAMS)
def test_placed_twins_are_bit_identical(src, dst, p):
    maps = np.random.default_rng(4).standard_normal((3,) + src).astype(np.float32)
    assert np.array_equal(ck.get("numba").upsample_placed(maps, *dst, *p),
                          ck.get("numpy").upsample_placed(maps, *dst, *p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("src,dst", [((8, 8), (128, 128)), ((4, 4), (64, 64)), ((14, 14), (224, 224)),
                                     ((7, 5), (224, 160)), ((3, 7), (100, 37)), ((224, 224), (14, 14))])
def test_naive_placement_is_upsample_bilinear_exactly(backend, src, dst):
    ns = ck.get(backend)
    maps = np.random.default_rng(5).standard_normal((2,) + src).astype(np.float32)
    g = naive_geometry(dst, src)
    assert np.array_equal(ns.upsample_placed(maps, *dst, *placement_params(g)), ns.upsample_bilinear(maps, *dst))


def test_placed_validation():
    with pytest.raises(ValueError):
        ck.upsample_placed(np.ones((1, 2, 2)), 4, 4, 0, 0, 1, 0)
    with pytest.raises(ValueError):
        ck.upsample_placed(np.ones((1, 2, 2)), 4, 4, 1, float("nan"), 1, 0)
    with pytest.raises(ValueError):
        ck.upsample_placed(np.ones((2, 2)), 4, 4, 1, 0, 1, 0)


# --- the runtime: metadata, default placement, naive for older exports ---------------------------------
def test_export_writes_geometry_and_explainer_places_by_it(onnx_model, val_images, tmp_path):
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.placement import PlacementError

    meta = {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}
    geo = json.loads(meta["geometry"])
    assert geo["stride"] == [16.0, 16.0] and geo["offset"] == [23.0, 23.0] and geo["rf"] == [109, 109]
    images = val_images[0][:3]
    ex = Explainer(onnx_model, warmup=False)
    assert ex.placement == "geometric"
    res = ex.explain(images, "gradcam")
    want = ck.normalize_minmax(ck.upsample_placed(res.cams, 64, 64, 16, 23, 16, 23))
    assert np.array_equal(res.heatmaps, want)
    naive = Explainer(onnx_model, warmup=False, placement="naive").explain(images, "gradcam")
    assert np.array_equal(naive.heatmaps, ck.normalize_minmax(ck.upsample_bilinear(res.cams, 64, 64)))
    assert np.array_equal(ex.heatmaps(res.cams, "naive"), naive.heatmaps)
    assert not np.array_equal(naive.heatmaps, res.heatmaps)
    # an older export (no geometry): naive, silently; asking for geometric says why not
    old = onnx.load(str(onnx_model))
    kept = [(p.key, p.value) for p in old.metadata_props if p.key != "geometry"]
    del old.metadata_props[:]
    for k, v in kept:
        old.metadata_props.add(key=k, value=v)
    onnx.save(old, str(tmp_path / "model.onnx"))
    assert Explainer(tmp_path / "model.onnx", warmup=False).placement == "naive"
    with pytest.raises(PlacementError, match="no receptive-field geometry"):
        Explainer(tmp_path / "model.onnx", warmup=False, placement="geometric")
    with pytest.raises(PlacementError, match="input gradients"):
        Explainer(onnx_model, warmup=False, placement="effective")


# --- the effective centre (evaluate/effective.py) ---------------------------------------------------------
def test_effective_centres_of_a_delta_kernel_sit_on_its_tap():
    """One Keras conv, k=4, stride 2, 'same' at 16 px (pads 1 before): with a delta at tap 2
    cell j's input gradient is a single pixel, 2 j - 1 + 2 = 2 j + 1, while the receptive
    field's centre is 2 j + 0.5: the measurement must find the tap, not the field."""
    pytest.importorskip("tensorflow", reason="the input gradients come from TensorFlow (the [train] extra)")
    import keras

    from explicam.evaluate.effective import cell_centres, fit_placement, keras_cell_saliency
    from explicam.export.geometry import geometry_from_keras

    inp = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(1, 4, strides=2, padding="same", activation="relu", use_bias=False, name="conv4")
    model = keras.Model(inp, conv(inp))
    w = np.zeros((4, 4, 3, 1), np.float32)
    w[2, 2, :, 0] = 1.0
    conv.set_weights([w])
    images = np.random.default_rng(0).uniform(0.1, 1.0, (3, 16, 16, 3)).astype(np.float32)
    centres = cell_centres(keras_cell_saliency(model, "conv4", images))
    j = np.arange(8)
    assert np.allclose(centres[..., 0], (2 * j + 1)[:, None]) and np.allclose(centres[..., 1], (2 * j + 1)[None, :])
    fit = fit_placement(centres)
    assert fit["stride"] == pytest.approx([2, 2]) and fit["offset"] == pytest.approx([1, 1], abs=1e-9)
    geo = geometry_from_keras(model, "conv4")
    assert geo["offset"] == [0.5, 0.5] and geo["stride"] == [2.0, 2.0]


def test_fit_placement_ignores_the_outer_ring():
    from explicam.evaluate.effective import fit_placement

    j = np.arange(6, dtype=float)
    centres = np.stack(np.broadcast_arrays((16 * j + 23)[:, None], (16 * j + 20)[None, :]), -1).copy()
    centres[0, :, 0] += 9.0  # a border cell pulled inwards
    fit = fit_placement(centres)
    assert fit["stride"] == pytest.approx([16, 16]) and fit["offset"] == pytest.approx([23, 20])
