"""Keras model files from anywhere, opened without running anything they carry, and their
forward graph as ONNX (ONNX files are opened by export/graph.py's load_model).

What a file from elsewhere never gets to do:
- run code: a Keras file's config is read as JSON first and a Lambda layer (pickled
  Python bytecode) or any class Keras does not ship is refused in one line before Keras
  deserialises anything; the load itself runs in Keras' safe mode;
- read files outside its folder: ONNX external data is loaded only from locations inside
  the model's own folder (no absolute paths, no `..`);
- exhaust memory: declared weight sizes and the input's static shape are added up from
  the header before a byte of weights is allocated.
"""
from __future__ import annotations

import json
import zipfile


class SourceError(ValueError):
    """A model file explicam will not open; str() is one line naming the file."""


# ----------------------------------------------------------------------------- Keras
def _keras_config(path: str) -> dict:
    """The model's architecture as plain JSON, read without Keras."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise SourceError(f"{path}: an HDF5 file without a model config (weights only?); "
                                  "save the whole model with model.save()")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{path}: cannot load Keras model (not a .keras zip or HDF5 file: "
                          f"{str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") from None


def _layers(config):
    """Every layer config in a (possibly nested) Keras model config."""
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            yield config
        for value in config.values():
            yield from _layers(value)
    elif isinstance(config, list):
        for value in config:
            yield from _layers(value)


def check_keras_config(path: str, config: dict) -> None:
    """Refuse, in one line, any layer that would run code from the file."""
    for layer in _layers(config):
        kind = layer.get("class_name")
        name = layer.get("config", {}).get("name", "?")
        if kind in ("Lambda", "TFOpLambda"):
            raise SourceError(f"{path}: layer '{name}' is a {kind} (Python code stored in the file); refused: "
                              "explicam never runs code from a model file. Replace it with built-in layers")
        module = layer.get("module") or ""
        registered = layer.get("registered_name") or ""
        if (registered and "Custom>" in registered) or (module and not module.startswith(("keras", "tf_keras"))):
            raise SourceError(f"{path}: layer '{name}' is a custom class ({registered or module}.{kind}); "
                              "refused: explicam loads only Keras' own layers")


def load_keras(path: str):
    check_keras_config(path, _keras_config(path))
    try:
        import keras
    except ImportError:
        raise SourceError(f"{path}: reading Keras models needs TensorFlow: pip install 'explicam[train]'") from None
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a corrupt zip / h5
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path}: cannot load Keras model: {first[:200]}") from None


def open_keras_as_onnx(model, input_hw=None, layer=None, opset: int = 17):
    """(ONNX forward graph, the feature tensor's name or None) of a Keras model: input
    `image` (N, H, W, C), output `explicam_scores` (the model's output). With `layer`, the
    tensor of that Keras layer is found by exposing it as a second output for tf2onnx to
    name, then dropping that output again; `layer` may be a list of names (several feature
    layers, export --layer a,b): a list of tensor names back."""
    import keras
    import tensorflow as tf
    import tf2onnx

    shape = list(model.input_shape)
    if isinstance(shape[0], (list, tuple)):
        raise SourceError(f"model '{model.name}' has {len(shape)} inputs; explicam explains single-image models")
    if len(shape) != 4:
        raise SourceError(f"model '{model.name}' takes input of shape {shape}; expected images (N, H, W, C)")
    h, w = shape[1], shape[2]
    if h is None or w is None:
        if not input_hw:
            raise SourceError(f"model '{model.name}' has a dynamic input size {shape[1:3]}; pass --input-size H,W")
        h, w = input_hw
    names = [] if layer is None else [layer] if isinstance(layer, str) else list(layer)
    for name in names:
        if name not in [lay.name for lay in model.layers]:
            convs = [lay.name for lay in model.layers if "Conv" in type(lay).__name__]
            raise SourceError(f"model has no layer named '{name}'; its convolution layers are: "
                              f"{', '.join(convs[-8:]) or 'none'}; pass --layer NAME or --layer auto")
    spec = tf.TensorSpec((None, h, w, shape[3]), tf.float32, name="image")
    exposed = [f"explicam_features{'_' + str(k) if k else ''}" for k in range(len(names))]
    probe = keras.Model(model.inputs, [model.output] + [model.get_layer(n).output for n in names])

    @tf.function(input_signature=(spec,))
    def forward(image):
        out = probe(image, training=False)
        out = out if names else [out]
        return {"explicam_scores": out[0], **dict(zip(exposed, out[1:]))}

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=(spec,), opset=opset)
    if not names:
        return proto, None
    # The extra output only names the feature tensor. tf2onnx keeps convolutions NCHW inside
    # and either renames the layer's tensor to it or hangs a Transpose / Identity off it for
    # the output alone, a side branch the score does not go through: then the tensor before.
    consumed = {i for n in proto.graph.node for i in n.input}
    found = []
    for feature in exposed:
        while feature not in consumed:
            producer = next(n for n in proto.graph.node if feature in n.output)
            if producer.op_type not in ("Transpose", "Identity"):
                break
            feature = producer.input[0]
        found.append(feature)
    keep = [o for o in proto.graph.output if o.name not in exposed]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    return proto, found[0] if isinstance(layer, str) else found
