"""Rows `cli.py bench` compares the runtime with that the runtime cannot build itself.

- The user's ORIGINAL ONNX file (the one `export --model FILE` read): its plain forward
  pass, on the same images preprocessed the way that file wants (the preprocessing the
  export recorded: scale, mean, std, channels, layout; export/prologue.py). This is the
  figure a user compares with: what explaining costs over running the model they had.
- pytorch-grad-cam's GradCAM (torch) on the same network and weights, for the networks
  export/zoo.py builds; it runs only after torch's logits are checked against the export.

The runtime never imports torch: these come in as callables (runtime/bench.py).
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np

TORCH_ROW = "pytorch-grad-cam GradCAM (torch)"


def original_path(model_path: str, meta: dict, given: str | None = None) -> str | None:
    """--original FILE, else the source the export recorded (its path relative to the
    model's folder, then the same name beside the model), when that is an ONNX file that
    exists."""
    if given:
        if not os.path.isfile(given):
            raise ValueError(f"--original: no such file {given}")
        return given
    folder = os.path.dirname(os.path.abspath(model_path))
    recorded = os.path.join(folder, meta["source_path"]) if meta.get("source_path") else None
    for path in (recorded, os.path.join(folder, meta.get("source_file") or "")):
        if path and path.lower().endswith(".onnx") and os.path.isfile(path):
            return os.path.normpath(path)
    return None


def preprocess_of(meta: dict):
    from explicam.export.prologue import Preprocess

    pre = meta.get("preprocess") or {}
    keys = ("scale", "mean", "std", "channels", "layout")
    return Preprocess(**{k: pre[k] for k in keys if k in pre})


def original_forward(model_path: str, given: str | None = None, threads: int | None = None, log=print):
    """(row name, bind, bind_photos) for run_bench's `original`, or None when there is no
    original ONNX file to time. bind(x) preprocesses the batch x (explicam's input: (N, H, W,
    3) RGB in [0, 1]) the original's way once and returns the zero-argument call that is
    timed; bind_photos(uint8 images, to_input) returns a call that also times that
    preprocessing, as every explanation row times explicam's."""
    import onnxruntime as ort

    from explicam.runtime.model import OnnxModel, session_options

    meta = OnnxModel(model_path, threads).meta
    path = original_path(model_path, meta, given)
    if path is None:
        if "preprocess" in meta:  # an export of another model whose source has moved
            log(f"  (no original ONNX file beside {model_path} or where its export read it: pass --original "
                "FILE for its row)")
        return None
    if "preprocess" not in meta:
        raise ValueError(f"{model_path}: no recorded preprocessing (an explicam-trained model); --original "
                         "applies to exports of other models (export --model FILE)")
    pre = preprocess_of(meta)
    session = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    fixed_one = inp.shape and inp.shape[0] == 1
    if fixed_one:
        log(f"  (the original {os.path.basename(path)} has a fixed batch of 1: its row is one call per image)")

    def bind(x):
        xp = pre.numpy(np.asarray(x, np.float32))
        if fixed_one and len(xp) > 1:
            return lambda: [session.run(None, {inp.name: xp[i:i + 1]}) for i in range(len(xp))]
        return lambda: session.run(None, {inp.name: xp})
    def bind_photos(images, to_input):
        """The same file from RGB uint8 photos, as its user runs it: the crop and resize
        (`to_input`: the export's own, explicam's preprocess) and the file's normalisation in numpy, timed."""
        def call():
            xp = pre.numpy(to_input(images))
            if fixed_one and len(xp) > 1:
                return [session.run(None, {inp.name: xp[i:i + 1]}) for i in range(len(xp))]
            return session.run(None, {inp.name: xp})
        return call
    log(f"  original ONNX file: {path}")
    return "forward, original file", bind, bind_photos


STAND_IN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops")


class _StandIn(types.ModuleType):
    """A module whose every attribute is a function that says torchvision is missing."""
    __path__: list = []  # a package, so `import torchvision.transforms` finds its stand-in too

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*_a, **_k):
            raise RuntimeError(f"{self.__name__}.{name}: torchvision is not importable here")
        return unavailable


def import_gradcam(log=print):
    """pytorch_grad_cam.GradCAM. pytorch-grad-cam imports torchvision when it is imported,
    for helpers GradCAM never calls (preprocess_image's transforms, SESS's resize, the
    detection target's box_iou). Where the installed torchvision cannot load (PyPI's CUDA
    build beside a CPU torch: "operator torchvision::nms does not exist"), those imports are
    served by stand-ins for the import alone, and the log says so."""
    try:
        from pytorch_grad_cam import GradCAM
        return GradCAM
    except ImportError:
        raise
    except Exception as exc:  # torchvision's own import error, a RuntimeError
        log(f"  (torchvision does not import here: {str(exc).splitlines()[-1][:80]}; pytorch-grad-cam's "
            "imports of it get stand-ins, which GradCAM never calls)")
    for k in [k for k in sys.modules if k.split(".")[0] in ("torchvision", "pytorch_grad_cam")]:
        del sys.modules[k]  # the half-imported modules of the failed attempt
    stand_ins = {name: _StandIn(name) for name in STAND_IN}
    for name, module in stand_ins.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_ins[parent], child, module)
    sys.modules.update(stand_ins)
    try:
        from pytorch_grad_cam import GradCAM
    finally:
        for name in STAND_IN:
            sys.modules.pop(name, None)
    return GradCAM


def torch_gradcam(model_path: str, threads: int | None = None, log=print) -> dict:
    """{TORCH_ROW: fn(x)} for a model made from export/zoo.py's networks when torch and
    pytorch-grad-cam are installed, else {} (with a line saying why). fn(x) takes explicam's
    input batch, preprocesses it the network's way and returns pytorch-grad-cam's heatmaps
    (top-1 class, at input size), the whole of its Grad-CAM call."""
    from explicam.export import zoo
    from explicam.runtime.model import OnnxModel

    model = OnnxModel(model_path, threads)
    stem = os.path.splitext(str(model.meta.get("source_file") or ""))[0]
    if stem not in zoo.NETWORKS:
        return {}
    # torch's OpenMP threads busy-wait after a call unless told not to; onnxruntime's pool
    # here stops spinning when a call returns (force_spinning_stop): no spinning thread of one
    # slowing the other's rows between calls (on a loaded 2-core box that made torch 20x slower)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch first loads OpenMP
    try:
        import torch
        GradCAM = import_gradcam(log)
        net = zoo.NETWORKS[stem]()
    except (ImportError, RuntimeError) as exc:
        log(f"  (no {TORCH_ROW} row: {str(exc).splitlines()[0][:160]}; pip install grad-cam)")
        return {}
    torch.set_num_threads(threads or os.cpu_count() or 1)  # the same cores as onnxruntime's pool
    pre = preprocess_of(model.meta)
    u = np.random.default_rng(0).random((2, *model.input_hw, 3), dtype=np.float32)
    want = model.run(u, np.full(2, -1, np.int64), ["logits"])["logits"]
    with torch.no_grad():
        got = net(torch.from_numpy(pre.numpy(u))).numpy()
    err = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
    if not err <= 1e-3:
        log(f"  (no {TORCH_ROW} row: zoo's {stem} is not the network in {model_path}, logits differ by {err:.1e})")
        return {}
    cam = GradCAM(model=net, target_layers=[zoo.feature_module(stem, net)])
    log(f"  {TORCH_ROW}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; its logits match the export's ({err:.1e})")

    def gradcam(x):
        return cam(input_tensor=torch.from_numpy(pre.numpy(np.asarray(x, np.float32))), targets=None)
    return {TORCH_ROW: gradcam}
