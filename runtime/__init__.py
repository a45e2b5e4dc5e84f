"""explicam.runtime: the edge explainer (ONNX model + CAM methods), no TensorFlow.

    from explicam import Explainer          # the same class, the short way
    ex = Explainer("runs/k4/model.onnx")
    res = ex.explain(images, method="gradcam")

The explainer core sits here (model, explainer, methods, masked, overlay, images, files,
bench; plain: RISE on an ONNX classifier explicam never exported); the video path (capture, loop, sinks, MJPEG server, video bench) in runtime/video/.
`embedded.py` stands alone: it imports nothing of explicam.
"""


def __getattr__(name):
    # Imported lazily so `explicam.runtime.images` stays usable without onnxruntime loaded.
    if name in ("Explainer", "Explanation"):
        from explicam.runtime import explainer
        return getattr(explainer, name)
    raise AttributeError(name)
