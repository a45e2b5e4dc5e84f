"""`cli.py evaluate` and `cli.py sweep`: how good the explanations are, and the kernel-size study."""
from __future__ import annotations

import os

import click

from explicam.cli import main
from explicam.console import friendly
from explicam.train import quiet_tensorflow
from explicam.cli import make_train_config, train_options  # noqa: F401
from explicam.cli_explain import feature_layer_option, method_options, placement_option, pop_method_options  # noqa: F401


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
