"""`cli.py explain` and `cli.py bench`: heatmaps for files, folders, video and cameras, and their speed."""
from __future__ import annotations

import os
import sys

import click

from explicam.cli import main
from explicam.console import Progress, friendly
from explicam.cli_export import make_preprocess, parse_hw, preprocess_options  # noqa: F401


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


SEED_OPTIONS = ("rise_seed", "smoothgrad_seed", "ig_seed")  # what explain's --seed draws


def pop_explain_options(kw: dict) -> dict:
    """explain's method options (removed from kw): the set ones, and --seed for every random draw."""
    seed = kw.pop("seed", None)
    return {**({} if seed is None else dict.fromkeys(SEED_OPTIONS, int(seed))), **pop_method_options(kw)}


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
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per onnxruntime call [default: 4 at 224 px, as many as make 4 x 224 x 224 pixels].")
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
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the random draws: RISE's masks, SmoothGrad's noise, the noise baseline of Integrated "
                   "Gradients (the same seed, the same heatmaps).")
@preprocess_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Images on Ray Data (cluster/): --ray (a Ray started here), --ray auto (this machine's "
                   "cluster) or --ray HOST:PORT; sources may also be CSV / Parquet files of image paths; adds "
                   "OUT/results/ (Parquet) and skips what it already holds.")
@click.option("--path-column", default="path", show_default=True, help="--ray: the image column of CSV / Parquet.")
@click.option("--concurrency", type=int, default=None, help="--ray: actors, each one Explainer [default: CPUs].")
@click.option("--cpus-per-actor", type=float, default=1.0, show_default=True,
              help="--ray: CPUs (and onnxruntime threads) per actor.")
@click.option("--ray-credentials", is_flag=True,
              help="--ray with s3:// sources: hand this shell's AWS keys to the actors (Ray shows a job's "
                   "environment to anyone who can see its dashboard); default: each node uses its own.")
@friendly
def explain(paths, model_path, method, target, out, top_k, alpha, colormap, side_by_side, heatmap, labels,
            batch_size, webcam, video, show, output, serve, host, token, no_token, certfile, keyfile, max_clients,
            reconnect, max_retries, realtime, max_frames, threads, placement, ray_address=None, path_column="path",
            concurrency=None, cpus_per_actor=1.0, ray_credentials=False, **more):
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

        options = pop_explain_options(more)
        if plain_preprocess(more):
            raise click.UsageError("preprocessing options (--scale, --mean, ...) apply to images for now; video "
                                   "and cameras need an explicam export")
        cfg = StreamConfig(model=model_path, method=method, target=target, show=show, output=output, serve=serve,
                           host=host, out=out, token=token, no_token=no_token, certfile=certfile, keyfile=keyfile,
                           max_clients=max_clients, reconnect=reconnect, max_retries=max_retries, alpha=alpha,
                           colormap=colormap, labels=labels, max_frames=max_frames, threads=threads,
                           placement=placement, feature_layer=more.pop("feature_layer", None), options=options)
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
    from explicam.runtime.files import FilesConfig, completeness_line, explain_files

    cfg = FilesConfig(model=model_path, out=out, method=method, target=target, top_k=top_k, alpha=alpha,
                      colormap=colormap, side_by_side=side_by_side, heatmap=heatmap, labels=labels,
                      batch_size=batch_size, threads=threads, placement=placement,
                      feature_layer=more.pop("feature_layer", None),
                      options=pop_explain_options(more), preprocess=plain_preprocess(more))
    if ray_address is not None:  # bulk, on Ray Data: cluster/explain.py
        from explicam.cluster.explain import RayConfig, explain_on_ray, summary_line

        rcfg = RayConfig(ray_address, concurrency, cpus_per_actor, path_column, credentials=ray_credentials)
        res = explain_on_ray(paths, cfg, rcfg,
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
    if (line := completeness_line(res, cfg.options)) is not None:
        click.echo(line)
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
def parse_counts(text: str, hint: str = "--ray-actors") -> tuple:
    try:
        counts = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers, got {text!r}", param_hint=hint)
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
@click.option("--profile", is_flag=True,
              help="Where one onnxruntime call's time goes, per op type, for each graph of the export (at the "
                   "first of --batches, on --threads).")
@friendly
def bench(model_path, methods, batches, threads, seconds, images_dir, out, original, video, frames, rounds,
          ray_address=None, ray_actors="1,2", profile=False):
    """Milliseconds per image of every method vs the plain forward pass, in one run."""
    from explicam.runtime.model import newest_model

    model_path = model_path or newest_model()
    if profile:   # runtime/op_profile.py
        from explicam.runtime.op_profile import profile_export, to_markdown as profile_table

        batch = parse_counts(batches, "--batches")[0]
        table = profile_table(profile_export(model_path, batch, threads), batch, threads)
        click.echo(table)
        _write_table(out, table)
        return
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
    _write_table(out, table)


def _write_table(out, table: str) -> None:
    """The Markdown table to `out` (if given), atomically: a crash leaves the old file or none."""
    if out:
        with open(out + ".partial", "w") as f:
            f.write(table + "\n")
        os.replace(out + ".partial", out)
