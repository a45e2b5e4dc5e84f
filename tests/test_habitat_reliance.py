"""A small but real run: the seed network trained where the background always follows the
class (habitat bias 1) loses accuracy when the same objects sit on another class's habitat;
trained without the bias it does not (evaluate/counterfactual.py through `evaluate`)."""
import pytest

from tests.conftest import quiet

SIZE, CLASSES = 32, 3


def _run(root, bias):
    from explicam.evaluate.evaluate import EvalConfig, run_evaluation
    from explicam.export.run import export_model
    from explicam.train import synth
    from explicam.train.fit import TrainConfig, train

    data = root / f"b{bias:g}"
    synth.generate(data, n_train=240, n_val=60, size=SIZE, num_classes=CLASSES, habitat_bias=bias, seed=4,
                   counterfactuals=True)
    cfg = TrainConfig(data=str(data), kernel=4, image_size=SIZE, batch_size=16, max_epochs=10, patience=10, seed=0,
                      flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0)
    train(cfg, run_dir=str(root / f"run{bias:g}"), verbose=0, log=quiet)
    onnx = export_model(run_dir=str(root / f"run{bias:g}"), samples=4, log=quiet)["onnx"]
    res = run_evaluation(onnx, str(data), EvalConfig(methods=["gradcam"], steps=2, sanity_images=0,
                                                     effective_images=0), log=quiet)
    return res["counterfactual"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="training needs the `train` extra (TensorFlow)")
    root = tmp_path_factory.mktemp("habitat")
    return {bias: _run(root, bias) for bias in (1.0, 0.0)}


def test_full_bias_loses_accuracy_on_swapped(measured):
    cf = measured[1.0]
    sw = cf["sets"]["swapped"]
    assert sw["images"] == 60 and sw["validation_accuracy"] > 0.6
    assert cf["drop_swapped"] > 0.15, cf  # the habitat moved, the prediction followed it
    assert cf["background_above_chance"] > 0.1, cf  # the empty habitat alone is still "recognised"


def test_no_bias_keeps_its_accuracy_on_swapped(measured):
    cf, biased = measured[0.0], measured[1.0]
    assert cf["sets"]["swapped"]["validation_accuracy"] > 0.5  # it learned the objects
    assert cf["drop_swapped"] < 0.1, cf
    assert abs(cf["background_above_chance"]) < 0.1, cf
    assert biased["drop_swapped"] - cf["drop_swapped"] > 0.15
    # on the swapped set the biased model follows the new habitat more often than this one
    assert biased["sets"]["swapped"]["follows_habitat"] > cf["sets"]["swapped"]["follows_habitat"]
