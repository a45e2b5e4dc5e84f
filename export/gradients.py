"""The gradient of a class score with respect to the conv4 features, written with forward ops.

Why this way: onnxruntime has no autograd, and tf2onnx 1.17 cannot convert a
tf.GradientTape graph of the seed's head (MaxPoolGrad has no ONNX handler). The layers
after conv4 are few and simple, so we write each one's vector-Jacobian product by hand
with ops ONNX has (MatMul, Reshape, ArgMax, OneHot, ConvTranspose...). The exported
graph then outputs the exact gradient for any target class, for any head built from the
layers below, and the runtime stays a plain forward pass. Each rule mirrors the op
TensorFlow's autodiff would use, so the result equals tf.GradientTape (the parity tests
check it for every class).

`head_layers` is the chain of layers from the feature layer to the logits; anything else
raises UnsupportedHead naming the layer.
"""
from __future__ import annotations

import tensorflow as tf

SUPPORTED = "Dense (linear or relu), Dropout, Flatten, MaxPooling2D (2x2, stride 2), " \
            "GlobalAveragePooling2D, Conv2D (stride 1, linear or relu), Activation(relu)"


class UnsupportedHead(ValueError):
    pass


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "linear") if act is not None else "linear"


def check_head(head_layers) -> None:
    """Raise UnsupportedHead for the first layer whose gradient we cannot write."""
    for layer in head_layers:
        kind = type(layer).__name__
        ok = kind in ("Dropout", "Flatten", "GlobalAveragePooling2D")
        if kind in ("Dense", "Conv2D", "Activation"):
            ok = _activation_name(layer) in ("linear", "relu")
            if kind == "Conv2D":
                ok = ok and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
        if kind == "MaxPooling2D":
            ok = tuple(layer.pool_size) == (2, 2) and tuple(layer.strides) == (2, 2)
        if not ok:
            raise UnsupportedHead(f"layer '{layer.name}' ({kind}) between the feature layer and the output "
                                  f"is not supported for gradient export; supported: {SUPPORTED}")


def _maxpool2x2_vjp(x, g):
    """MaxPool 2x2/2: route each window's gradient to its first maximum (row-major).

    TensorFlow's MaxPoolGrad sends the gradient to one element per window, the first
    maximum in row-major order; this matters because after ReLU many windows are all
    zeros. ArgMax (first index on ties, in TF and in ONNX) picks the same element.
    """
    # Static shapes with -1 for the batch: tf.shape(x)[0] became a dozen Shape/Gather/Cast/
    # Concat nodes in the ONNX graph, each a few microseconds of onnxruntime dispatch, which
    # mattered next to a 1.6 ms forward pass.
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    hh, ww = h // 2, w // 2
    if (h, w) != (hh * 2, ww * 2):
        x = x[:, :hh * 2, :ww * 2, :]  # valid pooling drops an odd last row/column
    blocks = tf.reshape(tf.transpose(tf.reshape(x, [-1, hh, 2, ww, 2, c]), [0, 1, 3, 2, 4, 5]), [-1, hh, ww, 4, c])
    # Equal against 0..3 rather than OneHot: the same mask, at a fraction of onnxruntime's OneHot cost.
    first = tf.expand_dims(tf.argmax(blocks, axis=3), 3)
    first_max = tf.cast(tf.equal(first, tf.reshape(tf.range(4, dtype=first.dtype), [1, 1, 1, 4, 1])), g.dtype)
    routed = first_max * tf.expand_dims(g, 3)
    out = tf.reshape(tf.transpose(tf.reshape(routed, [-1, hh, ww, 2, 2, c]), [0, 1, 3, 2, 4, 5]), [-1, hh * 2, ww * 2, c])
    if (h, w) != (hh * 2, ww * 2):
        out = tf.pad(out, [[0, 0], [0, h - hh * 2], [0, w - ww * 2], [0, 0]])
    return out


def _layer_vjp(layer, x, y, g):
    """Given the layer's input x, output y and dL/dy = g, return dL/dx."""
    kind = type(layer).__name__
    if kind in ("Dense", "Conv2D", "Activation") and _activation_name(layer) == "relu":
        g = g * tf.cast(y > 0, g.dtype)
    if kind == "Dense":
        return tf.matmul(g, layer.kernel, transpose_b=True)
    if kind == "Conv2D":
        # d conv / d input is the transposed convolution with the same kernel (TF's Conv2DBackpropInput).
        return tf.nn.conv2d_transpose(g, layer.kernel, tf.shape(x), strides=1, padding=layer.padding.upper())
    if kind == "Activation":
        return g
    if kind == "Dropout":
        return g  # identity at inference
    if kind == "Flatten":
        return tf.reshape(g, [-1, *x.shape[1:]])
    if kind == "GlobalAveragePooling2D":
        hw = float(x.shape[1] * x.shape[2])
        return tf.broadcast_to(g[:, None, None, :] / hw, tf.shape(x))
    if kind == "MaxPooling2D":
        return _maxpool2x2_vjp(x, g)
    raise UnsupportedHead(f"layer '{layer.name}' ({kind}) is not supported; supported: {SUPPORTED}")


def head_forward_and_grad(head_layers, features, target):
    """Run the head on `features` and differentiate logits[target] back to the features.

    target: int64 (N,) or broadcastable; a negative entry means "the top-1 class".
    Returns logits (N, classes), the chosen targets (N,), grads (same shape as features).
    """
    x, trace = features, []
    for layer in head_layers:
        y = layer(x, training=False)
        trace.append((layer, x, y))
        x = y
    logits = x
    top1 = tf.argmax(logits, axis=1, output_type=tf.int64)
    chosen = tf.where(target < 0, top1, tf.cast(target, tf.int64))
    last = trace[-1][0]
    if type(last).__name__ == "Dense" and _activation_name(last) == "linear":
        # d logits[t] / d x is column t of the kernel: a Gather instead of one-hot @ kernel^T.
        g = tf.gather(tf.transpose(last.kernel), chosen)
        trace = trace[:-1]
    else:
        g = tf.one_hot(chosen, tf.shape(logits)[1], dtype=logits.dtype)  # d logits[target] / d logits
    for layer, x_in, y_out in reversed(trace):
        g = _layer_vjp(layer, x_in, y_out, g)
    return logits, chosen, g
