"""explicam's edge runtime: ONNX model + CAM methods, no TensorFlow.

    from runtime import Explainer
    ex = Explainer("runs/k4/model.onnx")
    res = ex.explain(images, method="gradcam")
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so `runtime.images` stays usable without onnxruntime loaded.
    if name in ("Explainer", "Explanation"):
        from runtime import explainer
        return getattr(explainer, name)
    raise AttributeError(name)
