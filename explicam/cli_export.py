"""`cli.py export`: a model in, an explicam ONNX file out (the seed's runs and any classifier)."""
from __future__ import annotations

import os

import click

from explicam.cli import main
from explicam.console import friendly
from explicam.train import quiet_tensorflow


# ---------------------------------------------------------------------------- export
def preprocess_options(fn):
    """How raw pixels become the model's input (shared by export and, for RISE, explain)."""
    opts = [
        click.option("--scale", default="1/255", show_default=True,
                     help="Raw 0..255 pixels are multiplied by this first (1/255, 1, 2/255 ...)."),
        click.option("--mean", default=None, help="Per channel, after --scale: value = (pixel*scale - mean)/std; "
                     "one number or R,G,B (e.g. 0.485,0.456,0.406) [default: 0]."),
        click.option("--std", default=None, help="Per channel, after --scale [default: 1]."),
        click.option("--channels", type=click.Choice(["rgb", "bgr", "gray"]), default="rgb", show_default=True,
                     help="What the model's input channels are."),
        click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True,
                     help="The model's input layout (auto: the axis of size 1 or 3)."),
        click.option("--input-size", default=None, metavar="H,W",
                     help="Input height,width; required when the file's spatial size is dynamic."),
        click.option("--resize-shorter", type=int, default=None, metavar="S",
                     help="Resize the shorter side to S, then centre-crop to the input size (torchvision's "
                          "Resize + CenterCrop) [default: resize the whole photo]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def make_preprocess(scale, mean, std, channels):
    """The options as a Preprocess; a bad value is a one-line error naming its option."""
    from explicam.runtime.preprocess import Preprocess, parse_floats

    vals = parse_floats(scale, "--scale")
    if not vals or len(vals) != 1 or vals[0] <= 0:
        raise click.BadParameter(f"expected one positive number, got {scale!r}", param_hint="--scale")
    return Preprocess(scale=vals[0], mean=parse_floats(mean, "--mean") or [0.0],
                      std=parse_floats(std, "--std") or [1.0], channels=channels)


def parse_hw(text, option: str = "--input-size"):
    if text is None:
        return None
    try:
        parts = [int(v) for v in str(text).replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise click.BadParameter(f"expected H,W (two positive integers), got {text!r}", param_hint=option)
    return tuple(parts)


def is_explicam_run(model_path: str) -> bool:
    """A model.keras trained by `cli.py train` (its summary.json beside it): the seed path,
    with the blocks file and the parity against Keras on its own validation images."""
    folder = os.path.dirname(os.path.abspath(model_path))
    return model_path.endswith(".keras") and os.path.isfile(os.path.join(folder, "summary.json"))


@main.command()
@click.option("--kernel", default=4, show_default=True, help="Export runs/k{KERNEL}/model.keras.")
@click.option("--run-dir", default=None, help="Run folder holding model.keras.")
@click.option("--model", "model_path", default=None,
              help="Any image classifier: .onnx (PyTorch, TensorFlow, ...), .keras or .h5.")
@click.option("--layer", default="auto", show_default=True,
              help="Feature tensor: auto (the last convolutional stage), an ONNX tensor name or a Keras layer name; "
                   "several comma-separated (the first is the primary; the others are written as features_1, "
                   "grads_1, ... for multi-layer Layer-CAM and --feature-layer), or auto:K (auto and the K-1 stages "
                   "before it).")
@click.option("--output", default=None, help="The output to explain, when the graph has several.")
@preprocess_options
@click.option("--labels", default=None, type=click.Path(),
              help="Class names: one per line, a JSON list, or ImageNet synset lines.")
@click.option("--out", default=None, help="Output .onnx [default: model.onnx beside an explicam run's Keras "
              "model; runs/<file stem>/model.onnx for other files].")
@click.option("--int8", is_flag=True, help="Also write model.int8.onnx (static QDQ quantization) and compare.")
@click.option("--samples", default=8, show_default=True, help="Images for the parity check.")
@click.option("--input-grads", is_flag=True,
              help="Also write model.inputgrads.onnx: d score / d image through the whole network (and "
                   "model.guidedgrads.onnx: guided backpropagation) for saliency, smoothgrad, "
                   "integrated-gradients, guided-gradcam, and the "
                   "measured effective centres of the feature cells (--placement effective).")
@friendly
def export(kernel, run_dir, model_path, layer, output, scale, mean, std, channels, layout, input_size,
           resize_shorter, labels, out, int8, samples, input_grads):
    """Export a model to ONNX with features and their exact gradients, checked before writing.

    \b
      python cli.py export --kernel 4                                    an explicam run (runs/k4)
      python cli.py export --model resnet50.onnx --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
      python cli.py export --model net.keras --scale 1 --layer top_conv
    """
    if model_path and not is_explicam_run(model_path):
        from explicam.export.anymodel import ExportConfig, export_any

        if int8:
            raise click.BadParameter("INT8 export needs an explicam run's dataset; not available for --model "
                                     "files from elsewhere yet", param_hint="--int8")
        if model_path.lower().endswith((".keras", ".h5", ".hdf5")):
            quiet_tensorflow()
        cfg = ExportConfig(model=model_path, layer=layer, output=output,
                           pre=make_preprocess(scale, mean, std, channels), input_hw=parse_hw(input_size),
                           layout=layout, resize_shorter=resize_shorter, labels=labels, out=out,
                           samples=min(samples, 4), input_grads=input_grads)
        export_any(cfg, log=click.echo)
        return
    # TensorFlow's oneDNN kernels break ties between equal max-pool inputs their own way, so
    # the input gradients' parity against tf.GradientTape fails by a few 1e-3 on a trained
    # 224 px seed net (ties at one pixel in a thousand) while Eigen's agree to 2e-7: the
    # reference is taken with Eigen's (the export trains nothing; before TensorFlow loads)
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    quiet_tensorflow()
    from explicam.export.run import export_model, seed_layers

    layers = seed_layers(layer)
    export_model(kernel, run_dir, model_path, layers[0], out, int8, samples, log=click.echo,
                 extra_layers=layers[1:], input_grads=input_grads)
