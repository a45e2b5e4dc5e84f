"""`export --model FILE` for Keras classifiers explicam did not train: gradients against
tf.GradientTape, the auto layer of keras.applications networks, files that would run code."""

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import cli_in_process


def _meta(path):
    from explicam.runtime.model import parse_metadata

    return parse_metadata(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                          .get_modelmeta().custom_metadata_map)


def _export(tmp_path, model_file, *extra, name="model"):
    out = tmp_path / name / "model.onnx"
    res = cli_in_process("export", "--model", model_file, "--out", out, *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "self-check with onnxruntime" in res.stdout and out.is_file()
    return out, res.stdout


# ----------------------------------------------------------------------------- Keras
def _small_keras(path):
    """Conv, BatchNormalization, SeparableConv2D, a softmax Dense: not the seed network."""
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((40, 48, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.SeparableConv2D(16, 3, padding="same", name="sep")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Activation("relu", name="last")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(5, activation="softmax", name="fc")(x)
    model = keras.Model(inp, out)
    for layer in model.layers:  # inference statistics that are not the identity
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    model.save(path)
    return model


def _tape(model, layer, x, classes, dense="fc"):
    """(features, d pre-softmax score[c] / d features per class) from tf.GradientTape."""
    import keras
    import tensorflow as tf

    fc = model.get_layer(dense)
    probe = keras.Model(model.input, [model.get_layer(layer).output, fc.input])
    out = {}
    for c in classes:
        with tf.GradientTape() as tape:
            feats, pre = probe(tf.constant(x), training=False)
            tape.watch(feats)
            score = tf.reduce_sum((tf.matmul(pre, fc.kernel) + fc.bias)[:, c])
        out[c] = tape.gradient(score, feats).numpy()
    return feats.numpy(), out


def test_a_keras_model_of_another_shape_gets_exact_gradients(tmp_path):
    model = _small_keras(tmp_path / "small.keras")
    path, log = _export(tmp_path, tmp_path / "small.keras")
    meta = _meta(path)
    assert meta["input_size"] == [40, 48] and meta["head"] == "gap"  # GAP + one Dense: classic CAM applies
    assert "feature tensor:" in log and "(input of the final Softmax)" in log
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 40, 48, 3), dtype=np.float32)
    feats, grads = _tape(model, "last", x, range(5))
    for c in range(5):
        out = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"image": x, "target": np.full(3, c, np.int64)})))
        np.testing.assert_allclose(out["features"], feats, atol=1e-5)  # auto picked the last activation
        np.testing.assert_allclose(out["grads"], grads[c], atol=1e-6 * max(1, np.abs(grads[c]).max()))
    np.testing.assert_allclose(out["probabilities"], model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("arch, layer", [("MobileNetV2", "out_relu"), ("ResNet50", "conv5_block3_out")])
def test_keras_applications_auto_layer_and_gradients(tmp_path, arch, layer):
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(64, 64, 3), classes=4)
    model.save(tmp_path / f"{arch}.keras")
    path, log = _export(tmp_path, tmp_path / f"{arch}.keras", "--scale", "1")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((2, 64, 64, 3), dtype=np.float32)
    feats, grads = _tape(model, layer, x * 255.0, [0, 3], dense="predictions")  # --scale 1: raw pixels
    for c in (0, 3):
        out = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"image": x, "target": np.full(2, c, np.int64)})))
        np.testing.assert_allclose(out["features"], feats, rtol=1e-4, atol=1e-4 * np.abs(feats).max())
        np.testing.assert_allclose(out["grads"], grads[c], atol=2e-5 * np.abs(grads[c]).max())


def test_a_lambda_layer_is_refused_before_keras_reads_it(tmp_path):
    import keras

    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "lam.keras")
    res = cli_in_process("export", "--model", tmp_path / "lam.keras", "--out", tmp_path / "o" / "model.onnx")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "layer 'double' is a Lambda" in res.stderr and "never runs code" in res.stderr
    assert not (tmp_path / "o").exists()


