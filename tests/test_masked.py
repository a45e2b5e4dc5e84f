"""Score-CAM's masked inputs run block by block, only where a mask reaches (runtime/masked.py):
the same conv4 map and probabilities as the whole network on the whole masked image."""
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from conftest import SIZE
from explicam.export.blocks import build_blocks
from explicam.runtime.masked import MaskedForward
from explicam.runtime.model import OnnxModel
from explicam.train.model import build_model


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _masks(size, rng):
    """Masks that reach every part of the image: whole, none, single pixels in the corners and
    the centre, bands along each edge, two far-apart blobs, and upsampled sparse channels."""
    out = [np.ones((size, size)), np.zeros((size, size))]
    for y, x in [(0, 0), (0, size - 1), (size - 1, 0), (size - 1, size - 1), (size // 2, size // 2 - 1)]:
        m = np.zeros((size, size))
        m[y, x] = 0.7
        out.append(m)
    for sl in [np.s_[:3, :], np.s_[-2:, :], np.s_[:, :1], np.s_[:, -5:], np.s_[7:20, 30:33]]:
        m = np.zeros((size, size))
        m[sl] = rng.random(m[sl].shape)
        out.append(m)
    m = np.zeros((size, size))
    m[2:6, 3:9], m[50:60, 41:63] = 1.0, 0.25
    out.append(m)
    import cv2

    for _ in range(4):
        low = np.maximum(rng.normal(size=(size // 16, size // 16)), 0).astype(np.float32)
        up = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
        out.append(up / max(up.max(), 1e-6))
    return np.stack(out).astype(np.float32)


def _keras_conv4(model, x):
    import keras

    body = keras.Model(model.inputs, model.get_layer("conv4").output)
    return body(x, training=False).numpy()


@pytest.mark.parametrize("kernel,head", [(1, "flatten"), (2, "gap"), (3, "flatten"), (4, "flatten"),
                                         (4, "gap"), (5, "gap"), (8, "flatten")])
def test_crops_give_the_whole_network_s_conv4_and_probabilities(kernel, head):
    import keras

    keras.utils.set_random_seed(kernel)
    model = build_model(kernel, SIZE, 3, head)
    proto, geometry = build_blocks(model)
    assert geometry["kernel"] == kernel and geometry["pad_before"] + geometry["pad_after"] == kernel - 1
    from explicam.export.onnx import build_onnx

    _, head_proto = build_onnx(model)
    masked = MaskedForward(_session(proto), _session(head_proto), geometry, SIZE, workers=2)
    rng = np.random.default_rng(kernel)
    image = rng.random((SIZE, SIZE, 3), dtype=np.float32)
    masks = _masks(SIZE, rng)
    inputs = image[None] * masks[..., None]
    want = _keras_conv4(model, inputs)  # (M, h, w, C): Keras on the whole masked images
    scale = np.abs(want).max()
    for i, mask in enumerate(masks):
        got = masked.features(image.transpose(2, 0, 1), mask)[0].transpose(1, 2, 0)
        np.testing.assert_allclose(got, want[i], atol=1e-5 * scale, err_msg=f"kernel {kernel} mask {i}")
    logits = model(inputs, training=False).numpy()
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(masked.probabilities(image, masks), probs, atol=1e-5)
    # the work it reports: all of it for a whole mask, less for the centre pixel, least for a corner
    fractions = []
    for mask in (masks[0], masks[6], masks[2]):
        masked.work = [0.0, 0.0]
        masked.features(image.transpose(2, 0, 1), mask)
        fractions.append(masked.work_fraction)
    assert fractions[0] == 1.0 and fractions[0] > fractions[1] >= fractions[2] > 0, (kernel, fractions)
    assert kernel == 1 or fractions[1] > fractions[2]  # a 1x1 kernel reaches no neighbour


def test_a_wrong_padding_is_caught_by_the_export_parity_check():
    # The check that guards `cli.py export` must see an off-by-one in the crop geometry.
    from explicam.export.onnx import build_onnx
    from explicam.export.run import _blocks_parity

    model = build_model(4, SIZE, 3, "flatten")
    main, head = build_onnx(model)
    proto, geometry = build_blocks(model)
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3), dtype=np.float32)
    args = (_session(main), _session(head), proto.SerializeToString())
    assert _blocks_parity(*args, geometry, x) < 1e-5
    swapped = {**geometry, "pad_before": geometry["pad_after"], "pad_after": geometry["pad_before"]}
    assert _blocks_parity(*args, swapped, x) > 1e-4


def test_other_bodies_get_no_blocks_file():
    import keras
    from keras import layers

    assert build_blocks(build_model(4, SIZE, 3), "conv3") == (None, None)  # feature layer before the last conv
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs
    for i, f in enumerate((4, 4, 4, 4, 4)):
        x = layers.Conv2D(f, 3, strides=2 if i == 2 else 1, padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x) if i < 4 else x
    strided = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    assert build_blocks(strided) == (None, None)


def test_the_export_writes_and_the_runtime_uses_the_blocks(onnx_model, val_images):
    model = OnnxModel(onnx_model)
    assert model.meta["blocks_file"] == "model.blocks.onnx" and (onnx_model.parent / "model.blocks.onnx").is_file()
    masked = model.masked_forward()
    assert masked is not None and masked.workers >= 1
    x = model.preprocess(val_images[0][:1])
    feats = model.run(x, np.full(1, -1), ["features"])["features"][0]
    from explicam import camkernels

    acts = np.ascontiguousarray(feats.transpose(2, 0, 1))
    live = acts.max(axis=(1, 2)) > acts.min(axis=(1, 2))
    masks = camkernels.normalize_minmax(camkernels.upsample_bilinear(acts[live], SIZE, SIZE))
    want = model.probabilities(camkernels.masked_inputs(x[0], masks))
    assert masked.forward is not None  # masks that reach nearly everything run whole through it
    for whole_above in (0.0, 0.8, 2.0):  # always whole, the default, never whole
        masked.whole_above, masked.work = whole_above, [0.0, 0.0]
        np.testing.assert_allclose(masked.probabilities(x[0], masks), want, atol=1e-5)
        assert (masked.work_fraction == 1.0) == (whole_above == 0.0), (whole_above, masked.work_fraction)


def test_scorecam_without_or_with_a_foreign_blocks_file(onnx_model, onnx_gap_model, val_images, tmp_path):
    from explicam.runtime.explainer import Explainer

    img = val_images[0][1]
    cropped = Explainer(onnx_model).explain(img, "scorecam")
    whole = Explainer(onnx_model).explain(img, "scorecam", scorecam_crop=False)
    np.testing.assert_allclose(cropped.cams, whole.cams, atol=1e-5 * whole.cams.max())
    for name in ("model.onnx", "model.head.onnx", "model.forward.onnx"):
        shutil.copy(onnx_model.parent / name, tmp_path / name)
    alone = Explainer(tmp_path / "model.onnx")
    assert alone.model.masked_forward() is None  # no blocks file: whole masked images
    np.testing.assert_allclose(alone.explain(img, "scorecam").cams, whole.cams, atol=1e-5 * whole.cams.max())
    shutil.copy(onnx_gap_model.parent / "model.blocks.onnx", tmp_path / "model.blocks.onnx")
    assert OnnxModel(tmp_path / "model.onnx").masked_forward() is None  # another export's blocks: not used


def test_bad_shapes_are_refused(onnx_model):
    masked = OnnxModel(onnx_model).masked_forward()
    with pytest.raises(ValueError, match=r"expected an image \(64, 64, 3\)"):
        masked.probabilities(np.zeros((32, 32, 3), np.float32), np.zeros((1, 32, 32), np.float32))
