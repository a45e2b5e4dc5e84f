"""The seed network: architecture, names and the seed's parameter count."""
import pytest

from explicam.train.model import build_model


def test_seed_parameter_count():
    # The seed study's summary: kernel 2, 224x224x3, 10 classes -> 300,218 parameters.
    assert build_model(2, 224, 10).count_params() == 300_218


@pytest.mark.parametrize("kernel", [2, 4, 8])
def test_parameter_count_follows_the_formula(kernel):
    filters, c_in, total = (16, 32, 64, 128, 256), 3, 0
    for f in filters:
        total += kernel * kernel * c_in * f + f
        c_in = f
    total += (224 // 32) ** 2 * 256 * 10 + 10  # flatten of 7x7x256 -> Dense(10)
    assert build_model(kernel, 224, 10).count_params() == total


def test_layers_are_named_and_conv4_is_14x14x256():
    model = build_model(4, 224, 10)
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.name for c in convs] == ["conv0", "conv1", "conv2", "conv3", "conv4"]
    assert [c.filters for c in convs] == [16, 32, 64, 128, 256]
    assert all(c.kernel_size == (4, 4) and c.padding == "same" and c.strides == (1, 1) for c in convs)
    assert tuple(model.get_layer("conv4").output.shape[1:]) == (14, 14, 256)
    assert model.get_layer("dropout").rate == pytest.approx(0.2)


def test_gap_head_is_conv4_gap_dense():
    model = build_model(4, 224, 10, head="gap")
    names = [layer.name for layer in model.layers]
    assert names[-3:] == ["conv4", "gap", "logits"]
    assert model.count_params() == build_model(4, 224, 10).count_params() - (7 * 7 * 256 * 10 + 10) + 256 * 10 + 10


@pytest.mark.parametrize("kwargs, message", [
    ({"input_size": 100}, "multiple of 32"),
    ({"head": "mlp"}, "--head"),
    ({"num_classes": 1}, "two classes"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
