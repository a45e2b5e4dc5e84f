"""The seed study's network: five Conv2D layers (16..256 filters, square kernel K),
each followed by 2x2 max pooling, then Flatten, Dropout(0.2), Dense(classes).

The convolutions are named conv0..conv4; conv4 is the last one, whose feature map the
explainer uses (the seed's `conv2d_4`). The Dense layer outputs logits (no softmax):
Grad-CAM differentiates the class score before the softmax, and the export adds the
softmax as a separate output.
"""
from __future__ import annotations

FILTERS = (16, 32, 64, 128, 256)
FEATURE_LAYER = "conv4"
HEADS = ("flatten", "gap")


def check_input_size(input_size: int) -> None:
    # Five 2x2 poolings: a size that is not a multiple of 32 would silently drop border rows.
    if input_size < 32 or input_size % 32:
        raise ValueError(f"--image-size must be a multiple of 32 (five 2x2 poolings), got {input_size}")


def build_model(kernel: int = 4, input_size: int = 224, num_classes: int = 10,
                head: str = "flatten", dropout: float = 0.2):
    """Build the (uncompiled) seed network.

    head="flatten": the seed's head (pool4, Flatten, Dropout, Dense).
    head="gap": conv4, GlobalAveragePooling, Dense: the head classic CAM (Zhou 2016) needs.
    """
    import keras
    from keras import layers

    if head not in HEADS:
        raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if kernel < 1:
        raise ValueError(f"--kernel must be a positive integer, got {kernel}")
    if num_classes < 2:
        raise ValueError(f"need at least two classes, got {num_classes}")
    check_input_size(input_size)

    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = inputs
    for i, filters in enumerate(FILTERS):
        x = layers.Conv2D(filters, kernel, strides=1, padding="same", activation="relu", name=f"conv{i}")(x)
        if i < len(FILTERS) - 1 or head == "flatten":
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    if head == "flatten":
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dropout(dropout, name="dropout")(x)
    else:
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"explicam_k{kernel}_{head}")
