"""Input gradients written into ONNX (export --input-grads) against tf.GradientTape: the seed
network through export/onnx.py build_onnx (with an earlier layer, export --layer conv4,conv3),
and a small Keras model through `export --model ... --input-grads` (its prologue's Mul).
Random images: see test_input_grads.py."""
import numpy as np
import onnxruntime as ort
import pytest

from tests.test_anymodel_keras import _export, _meta

H, W = 40, 48


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(float(np.abs(want).max()), 1e-12))


def _images(n, seed=0, h=H, w=W):
    return np.random.default_rng(seed).random((n, h, w, 3), dtype=np.float32)


def _side(path):
    return ort.InferenceSession(str(path).replace("model.onnx", "model.inputgrads.onnx"),
                                providers=["CPUExecutionProvider"])


def test_the_seed_network_input_gradients_equal_gradient_tape():
    pytest.importorskip("tensorflow", reason="the reference is tf.GradientTape (the [train] extra)")
    import keras
    import tensorflow as tf

    from explicam.export.input_grads import input_grads_model
    from explicam.export.onnx import build_onnx, classifier_only
    from explicam.train.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(kernel=4, input_size=64, num_classes=4)
    main, _ = build_onnx(model, "conv4", extra=["conv3"])
    side = ort.InferenceSession(input_grads_model(classifier_only(main)).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(main.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _images(3, 1, 64, 64)
    for c in range(4):
        t = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(t)
            conv3 = keras.Model(model.input, [model.get_layer("conv3").output, model.output])
            f3, logits = conv3(t, training=False)
            score = tf.reduce_sum(logits[:, c])
        want, want3 = tape.gradient(score, t).numpy(), tape.gradient(score, f3).numpy()
        got = side.run(["input_grads", "target_used"], {"image": x, "target": np.full(3, c, np.int64)})
        assert _rel(got[0], want) < 1e-5 and (got[1] == c).all()
        assert _rel(session.run(["grads_1"], {"image": x, "target": np.full(3, c, np.int64)})[0], want3) < 1e-5


def test_a_keras_model_exported_with_input_grads_through_the_cli(tmp_path):
    pytest.importorskip("tensorflow", reason="the reference is tf.GradientTape (the [train] extra)")
    import keras
    import tensorflow as tf

    from tests.test_anymodel_keras import _small_keras

    model = _small_keras(tmp_path / "small.keras")
    path, log = _export(tmp_path, tmp_path / "small.keras", "--input-grads", "--scale", "1")
    assert "input gradients against finite differences" in log and "effective centres" in log
    meta = _meta(path)
    assert meta["input_grads_file"] == "model.inputgrads.onnx" and meta["effective_geometry"]["images"] == 4
    assert meta["guided_grads_file"] == "model.guidedgrads.onnx" and (path.parent / "model.guidedgrads.onnx").exists()
    x = _images(3, 2)
    fc = model.get_layer("fc")
    probe = keras.Model(model.input, fc.input)
    for c in (0, 4):
        t = tf.constant(x * 255.0)   # --scale 1: the model reads 0..255, the prologue multiplies by 255
        with tf.GradientTape() as tape:
            tape.watch(t)
            score = tf.reduce_sum((tf.matmul(probe(t, training=False), fc.kernel) + fc.bias)[:, c])
        want = tape.gradient(score, t).numpy() * 255.0   # d score / d image = 255 d score / d pixel value
        got = _side(path).run(["input_grads"], {"image": x, "target": np.full(3, c, np.int64)})[0]
        assert _rel(got, want) < 1e-5


def test_the_randomisation_test_rebuilds_the_side_file_and_the_layers(tmp_path):
    """evaluate's sanity cascade re-exports the randomised network as the trained file was made:
    with its input gradients and its extra layers, so every method runs on it."""
    pytest.importorskip("tensorflow", reason="the randomisation test rebuilds the Keras model (the [train] extra)")
    import keras

    from explicam.evaluate.sanity import randomised_models
    from explicam.runtime.explainer import Explainer
    from explicam.train.model import build_model

    keras.utils.set_random_seed(2)
    build_model(kernel=4, input_size=64, num_classes=3).save(tmp_path / "model.keras")
    layer = {"geometry": None, "feature_shape": [4, 4, 256]}
    meta = {"class_names": ["a", "b", "c"], "input_size": 64, "value_range": [0.0, 1.0], "feature_layer": "conv4",
            "feature_shape": [4, 4, 256], "head": "flatten", "head_file": "model.head.onnx", "export_id": "e1",
            "input_grads_file": "model.inputgrads.onnx", "guided_grads_file": "model.guidedgrads.onnx",
            "feature_layers": [{**layer, "name": "conv4", "layer": "conv4", "features": "features", "grads": "grads"},
                               {"name": "conv3", "layer": "conv3", "features": "features_1", "grads": "grads_1",
                                "feature_shape": [8, 8, 128], "geometry": None}]}
    images = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    cascade = randomised_models(str(tmp_path / "model.onnx"), meta, 0)   # its files live while it does
    stage, path = next(cascade)
    ex = Explainer(path, warmup=False)
    assert ex.explain(images, "saliency").cams.shape == (2, 64, 64)
    assert ex.explain(images, "guided-gradcam").cams.shape == (2, 64, 64)   # the guided file rebuilt too
    assert ex.explain(images, "layercam").cams.shape == (2, 64, 64)   # fused over conv4 and conv3
