"""ONNX export: outputs, metadata, parity with Keras (values and exact gradients), atomic
writes and clear errors."""
import json

import numpy as np
import onnxruntime as ort
import pytest

from explicam.export.onnx import build_onnx
from explicam.export.parity import compare, failures, gradcam_from_onnx_outputs, keras_tutorial_gradcam, minmax
from tests.conftest import SIZE, cli_in_process, quiet
from explicam.train.model import build_model


def _session(proto_or_path):
    src = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _json_or_text(value):
    try:
        return json.loads(value)
    except ValueError:
        return value


@pytest.mark.parametrize("kernel", [2, 4, 8])
@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_untrained_parity_every_class(kernel, head):
    model = build_model(kernel, SIZE, 3, head)
    main, head_proto = build_onnx(model)
    session = _session(main)
    rng = np.random.default_rng(kernel)
    for batch in (1, 8):
        report = compare(model, session, rng.random((batch, SIZE, SIZE, 3), dtype=np.float32))
        assert not failures(report), report


def test_trained_parity_on_real_images(trained_run, onnx_model, val_images):
    import keras

    run, _ = trained_run
    model = keras.models.load_model(run / "model.keras")
    session = _session(str(onnx_model))
    images, _ = val_images
    x = np.stack([np.asarray(__import__("cv2").resize(i, (SIZE, SIZE)), np.float32) / 255 for i in images])
    for batch in (x[:1], x[:8]):
        report = compare(model, session, batch)
        assert not failures(report), report


def test_trained_gap_parity(trained_gap_run, onnx_gap_model, val_images):
    import keras
    import cv2

    run, _ = trained_gap_run
    model = keras.models.load_model(run / "model.keras")
    x = np.stack([cv2.resize(i, (SIZE, SIZE)).astype(np.float32) / 255 for i in val_images[0]])
    report = compare(model, _session(str(onnx_gap_model)), x)
    assert not failures(report), report


def test_outputs_shapes_and_metadata(onnx_model, trained_run):
    _, summary = trained_run
    session = _session(str(onnx_model))
    # target is an input with a default (an initializer of the same name): onnxruntime lists
    # it among the overridable initializers, not the required inputs
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [i.name for i in session.get_overridable_initializers()] == ["target"]
    assert session.get_inputs()[0].shape[1:] == [SIZE, SIZE, 3]
    x = np.random.default_rng(0).random((3, SIZE, SIZE, 3), dtype=np.float32)
    out = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": x, "target": np.array([-1, 0, 2])})))
    h = SIZE // 16
    assert out["features"].shape == (3, h, h, 256) and out["grads"].shape == (3, h, h, 256)
    assert out["logits"].shape == (3, len(summary["class_names"]))
    np.testing.assert_allclose(out["probabilities"].sum(1), 1, atol=1e-5)
    assert out["target_used"].tolist() == [int(out["logits"][0].argmax()), 0, 2]
    assert (out["features"] >= 0).all()  # after ReLU
    meta = {k: _json_or_text(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["class_names"] == summary["class_names"]
    assert meta["input_size"] == SIZE and meta["value_range"] == [0.0, 1.0]
    assert meta["kernel"] == 4 and meta["head"] == "flatten" and meta["feature_layer"] == "conv4"
    assert meta["training_summary"]["epochs_run"] == summary["epochs_run"]
    assert meta["explicam_version"] and meta["head_file"] == "model.head.onnx"
    head = _session(str(onnx_model.parent / "model.head.onnx"))
    np.testing.assert_allclose(head.run(["logits"], {"features": out["features"]})[0], out["logits"], atol=1e-4)
    # the pruned classifier: the image alone in, logits, probabilities and the primary features
    # out (Finer-CAM alone reads them: runtime/explainer.py), the same numbers as the main graph
    assert meta["forward_file"] == "model.forward.onnx"
    forward = _session(str(onnx_model.parent / "model.forward.onnx"))
    assert [i.name for i in forward.get_inputs()] == ["image"]
    assert [o.name for o in forward.get_outputs()] == ["logits", "probabilities", "features"]
    logits, probs, feats = forward.run(None, {"image": x})
    np.testing.assert_allclose(logits, out["logits"], atol=1e-6)
    np.testing.assert_allclose(probs, out["probabilities"], atol=1e-7)
    np.testing.assert_array_equal(feats, out["features"])


def test_probabilities_use_the_pruned_classifier_and_work_without_it(onnx_model, tmp_path):
    import shutil

    from explicam.runtime.model import OnnxModel

    x = np.random.default_rng(3).random((5, SIZE, SIZE, 3), dtype=np.float32)
    model = OnnxModel(onnx_model)
    full = model.run(x, np.full(5, -1))["probabilities"]
    assert model.forward_session() is not None
    np.testing.assert_allclose(model.probabilities(x, batch_size=2), full, atol=1e-7)
    # a copy without model.forward.onnx (only model.onnx carried to a device): same answer, main graph
    for name in ("model.onnx", "model.head.onnx"):
        shutil.copy(onnx_model.parent / name, tmp_path / name)
    alone = OnnxModel(tmp_path / "model.onnx")
    assert alone.forward_session() is None
    np.testing.assert_allclose(alone.probabilities(x, batch_size=2), full, atol=1e-7)


def test_side_files_of_another_export_are_not_used(onnx_model, onnx_gap_model, tmp_path):
    import shutil

    from explicam.runtime.model import ModelError, OnnxModel

    # the gap model's model.onnx copied over on its own, beside the flatten model's side files
    for name in ("model.head.onnx", "model.forward.onnx"):
        shutil.copy(onnx_model.parent / name, tmp_path / name)
    shutil.copy(onnx_gap_model, tmp_path / "model.onnx")
    mixed = OnnxModel(tmp_path / "model.onnx")
    assert mixed.export_id and mixed.export_id != OnnxModel(onnx_model).export_id
    x = np.random.default_rng(4).random((3, SIZE, SIZE, 3), dtype=np.float32)
    assert mixed.forward_session() is None  # the main graph answers: the gap model's own numbers
    np.testing.assert_allclose(mixed.probabilities(x), OnnxModel(onnx_gap_model).probabilities(x), atol=1e-7)
    with pytest.raises(ModelError, match="another export"):
        mixed.head(np.zeros((1,) + mixed.feature_shape, np.float32))
    (tmp_path / "model.head.onnx").unlink()
    with pytest.raises(ModelError, match="model.head.onnx: no such file"):
        OnnxModel(tmp_path / "model.onnx").head(np.zeros((1,) + mixed.feature_shape, np.float32))


def test_onnx_gradcam_equals_keras_tutorial_after_normalisation(trained_run, onnx_model, val_images):
    import cv2
    import keras

    run, _ = trained_run
    model = keras.models.load_model(run / "model.keras")
    session = _session(str(onnx_model))
    for img in val_images[0][:4]:
        x = cv2.resize(img, (SIZE, SIZE)).astype(np.float32)[None] / 255
        f, g = session.run(["features", "grads"], {"image": x, "target": np.array([-1])})
        ours = minmax(gradcam_from_onnx_outputs(f, g)[0])
        ref = minmax(keras_tutorial_gradcam(model, "conv4", x[0]))
        assert np.abs(ours - ref).max() < 1e-4


def test_other_feature_layer_with_conv_in_the_head():
    # --layer conv3: the head then holds pool3, conv4 and pool4, whose gradients must also be exact.
    model = build_model(4, SIZE, 3)
    main, _ = build_onnx(model, "conv3")
    report = compare(model, _session(main), np.random.default_rng(1).random((2, SIZE, SIZE, 3), np.float32),
                     "conv3")
    assert not failures(report), report


def test_export_cli_writes_files_and_reports_parity(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "m" / "model.onnx"
    res = cli_in_process("export", "--run-dir", run, "--out", out, "--samples", 2)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "parity on 2 validation images" in res.stdout and "grads_rel" in res.stdout
    assert out.is_file() and (tmp_path / "m" / "model.head.onnx").is_file()
    assert (tmp_path / "m" / "model.forward.onnx").is_file() and "forward_probabilities" in res.stdout
    assert "forward_features 0.0e+00" in res.stdout
    assert not list(tmp_path.glob("m/*.partial"))


def test_parity_failure_leaves_no_model(trained_run, tmp_path, monkeypatch):
    import explicam.export.run as export_run

    run, _ = trained_run
    monkeypatch.setattr(export_run, "check_parity", lambda *a, **k: {"logits": 0.5, "grads_rel": 0.0})
    out = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match="logits differs by 5.00e-01"):
        export_run.export_model(run_dir=str(run), out=str(out), samples=2, log=quiet)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("setup, args, message", [
    ("none", ["--run-dir", "{tmp}/nothing"], "run folder"),
    ("empty", ["--run-dir", "{tmp}/empty"], "has no model.keras"),
    ("corrupt", ["--model", "{tmp}/bad.keras"], "cannot load Keras model"),
    ("noconv4", ["--model", "{tmp}/odd.keras", "--layer", "conv4"],
     "no layer named 'conv4'; its convolution layers are: c1, c2"),
    ("unsupported", ["--model", "{tmp}/upsample.keras"], "(Softsign) between"),
])
def test_bad_export_input_gets_one_line(tmp_path, setup, args, message):
    import keras

    if setup == "empty":
        (tmp_path / "empty").mkdir()
    if setup == "corrupt":
        (tmp_path / "bad.keras").write_bytes(b"PK\x03\x04 not really a zip")
    if setup == "noconv4":
        inp = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(4, 3, name="c1")(inp)
        x = keras.layers.Conv2D(4, 3, name="c2")(x)
        keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(x))).save(tmp_path / "odd.keras")
    if setup == "unsupported":  # an op without a gradient rule between the features and the score
        inp = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(4, 3, name="conv4")(inp)
        x = keras.layers.Activation("softsign", name="soft")(x)   # Softsign: no rule (Resize has one now)
        keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(x))).save(tmp_path / "upsample.keras")
    res = cli_in_process("export", *[a.format(tmp=tmp_path) for a in args])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert message in res.stderr, res.stderr[-1500:]
    assert not list(tmp_path.rglob("*.onnx"))


@pytest.mark.parametrize("kernel", [2, 8])
def test_trained_parity_for_other_kernels(kernel, synth_dir, tmp_path):
    # A short real training run (not just random weights) for the kernels the seed also used.
    import keras

    from explicam.train.fit import TrainConfig, train

    cfg = TrainConfig(data=str(synth_dir), kernel=kernel, image_size=32, batch_size=32, max_epochs=2, seed=0)
    train(cfg, run_dir=str(tmp_path / "run"), verbose=0, log=quiet)
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    main, _ = build_onnx(model)
    x = np.random.default_rng(kernel).random((8, 32, 32, 3), dtype=np.float32)
    for batch in (x[:1], x):
        report = compare(model, _session(main), batch)
        assert not failures(report), report
