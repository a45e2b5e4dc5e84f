"""Bulk explanations on Ray Data: `python cli.py explain SRC... --ray [ADDRESS]`.

    driver: sources -> items (path, output stem) -> minus what OUT/results/ already holds
    Ray Data: from_items -> map_batches(ExplainActor, an actor pool) -> iter_batches back
    actor:  one Explainer (model loaded, kernels warmed once) + the one-machine Writer:
            overlays / heatmaps into OUT/ exactly as `explain` names them; one row per
            (image, method), a bad image a row with an error
    driver: rows -> OUT/results/part-*.parquet (keyed by path: no duplicates), then
            OUT/predictions.csv rebuilt from every row, as the one-machine path writes it

A worker that dies costs a retry: Ray restarts the actor (max_restarts) and re-runs its
batch (max_task_retries); the files it writes are keyed by path and replaced atomically,
and the driver keeps the first row of each key. On a cluster OUT must be a folder every
node can write (a shared file system), and the model path must be readable everywhere.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from explicam.cluster import connect, require_ray
from explicam.cluster.results import RESULTS_DIR, ResultSink, done_keys, rows_table, write_predictions_csv
from explicam.cluster.sources import collect_sources, read_any, reader_env
from explicam.runtime.files import DECODE_MIN_SIDE, READ_BATCH, FilesConfig, Item, Writer, check_writable, parse_methods
from explicam.runtime.images import ImageError


@dataclass
class RayConfig:
    """How `explain --ray` spreads the work (its options)."""
    address: str | None = None      # None/"local": a Ray started here; "auto": this machine's cluster; host:port
    concurrency: int | None = None  # actors [default: the cluster's CPUs / cpus_per_actor]
    cpus_per_actor: float = 1.0     # also the actor's onnxruntime threads (rounded up)
    path_column: str = "path"       # the image column of CSV / Parquet sources
    num_cpus: int | None = None     # a local Ray's CPUs [default: all]
    credentials: bool = False       # hand the driver's AWS keys to the actors (Ray shows them to its users)


@dataclass
class RayResult:
    out: str
    results: str                    # the Parquet folder
    csv: str | None
    methods: list
    explained: int = 0              # images explained in this run
    errors: int = 0                 # images that became error rows in this run
    already_done: int = 0           # images skipped because OUT/results/ held them
    total: int = 0
    actors: int = 0
    seconds: float = 0.0
    first_rows_s: float = 0.0       # from the Ray work's start to the first results back (actors, models)
    first_rows_at: float = 0.0      # time.perf_counter() then
    first_rows: int = 0             # images in that first batch
    notes: list = field(default_factory=list)


@dataclass
class ActorSpec:
    """What each actor needs to build its Explainer and Writer (pickled once per actor)."""
    files: FilesConfig
    methods: list
    top_k: int
    threads: int


class ExplainActor:
    """One Explainer per actor process; called with batches {"path": [...], "stem": [...]}."""

    def __init__(self, spec: ActorSpec):
        from explicam.runtime.explainer import Explainer

        cfg = spec.files
        self.explainer = Explainer(cfg.model, kernels=cfg.kernels, threads=spec.threads,
                                   batch_size=cfg.batch_size, placement=cfg.placement)  # warms the kernels
        self.methods, self.target = spec.methods, cfg.target
        self.writer = Writer(cfg, spec.methods, spec.top_k)
        self.min_side = max(*self.explainer.input_hw, DECODE_MIN_SIDE)

    def __call__(self, batch: dict):
        items = [Item(str(p), str(s)) for p, s in zip(batch["path"], batch["stem"])]
        rows, good = [], []
        for item in items:
            try:
                good.append((item, read_any(item.path, self.min_side)))
            except ImageError as exc:
                rows += self._error_rows(item, str(exc))
        if good:
            try:
                rows += self._explain(good)
            except Exception:  # noqa: BLE001 - one odd image must not fail the batch: find it alone
                for one in good:
                    try:
                        rows += self._explain([one])
                    except Exception as exc:  # noqa: BLE001
                        rows += self._error_rows(one[0], f"{one[0].path}: {type(exc).__name__}: {exc}")
        return rows_table(rows)

    def _error_rows(self, item: Item, message: str) -> list:
        return [{"path": item.path, "stem": item.stem, "method": m, "error": message} for m in self.methods]

    def _explain(self, good: list) -> list:
        results = self.explainer.explain_methods([p for _, p in good], self.methods, self.target)
        maps = {m: self.explainer.k.normalize_minmax(results[m].cams) for m in self.methods}
        first = results[self.methods[0]]
        rows = []
        for i, (item, photo) in enumerate(good):
            try:
                path, _ = self.writer.write(item, photo, results, i)
                output, error = os.path.relpath(path, self.writer.out), None
            except OSError as exc:
                output, error = None, f"{item.path}: cannot write its output ({exc.strerror or exc})"
            top = first.top_k(self.writer.top_k)[i]
            for m in self.methods:
                heat = maps[m][i]
                rows.append({"path": item.path, "stem": item.stem, "method": m,
                             "classes": [c for c, _ in top], "probabilities": [p for _, p in top],
                             "target": first.target_names[i], "target_index": int(first.targets[i]),
                             "output": output, "heatmap": heat.ravel().tolist(),
                             "heatmap_h": heat.shape[0], "heatmap_w": heat.shape[1], "error": error})
        return rows


def _prepare(sources, cfg: FilesConfig, rcfg: RayConfig):
    """Driver-side checks before any Ray work: options, inputs, output folder, model."""
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.files import usable_methods
    from explicam.runtime.methods import METHODS
    from explicam.runtime.model import newest_model

    methods = parse_methods(cfg.method, list(METHODS))
    Writer(cfg, methods)  # bad --alpha / --colormap / --heatmap fail now
    items, problems = collect_sources(sources, cfg.out, rcfg.path_column)
    if not items:
        raise ValueError(problems[0] if len(problems) == 1 else "nothing to explain: " + "; ".join(problems))
    check_writable(cfg.out)
    cfg = replace(cfg, model=os.path.abspath(cfg.model or newest_model()), out=os.path.abspath(cfg.out))
    probe = Explainer(cfg.model, kernels="numpy", threads=1, warmup=False, placement=cfg.placement)
    probe.resolve_targets(cfg.target, 1)  # an unknown --target fails here, not in every actor
    notes = list(problems)
    methods = usable_methods(probe, methods, notes)
    return cfg, items, methods, min(cfg.top_k, len(probe.class_names)), notes


def explain_on_ray(sources, cfg: FilesConfig, rcfg: RayConfig | None = None, log=print) -> RayResult:
    """Explain every image of `sources` on Ray into cfg.out (see the module docstring)."""
    rcfg = rcfg or RayConfig()
    require_ray()  # before any work: without the cluster extra, say what to install
    t0 = time.perf_counter()
    cfg, items, methods, top_k, notes = _prepare(sources, cfg, rcfg)
    folder = os.path.join(cfg.out, RESULTS_DIR)
    done = done_keys(folder)
    todo = [it for it in items if not all((it.path, m) in done for m in methods)]
    res = RayResult(cfg.out, folder, None, methods, already_done=len(items) - len(todo), total=len(items),
                    notes=notes)
    if res.already_done:
        log(f"{res.already_done} of {len(items)} image(s) already in {folder}: skipped")
    if todo:
        _run(todo, cfg, rcfg, ActorSpec(cfg, methods, top_k, max(1, math.ceil(rcfg.cpus_per_actor))), done, res,
             log)
    csv_path = os.path.join(cfg.out, "predictions.csv")
    if write_predictions_csv(folder, csv_path, top_k, {it.path: i for i, it in enumerate(items)}):
        res.csv = csv_path
    res.seconds = time.perf_counter() - t0
    return res


def actor_count(ray, rcfg: RayConfig, n_batches: int) -> int:
    if rcfg.concurrency:
        return max(1, int(rcfg.concurrency))
    cpus = ray.cluster_resources().get("CPU", 1)
    return max(1, min(n_batches, int(cpus // rcfg.cpus_per_actor)))


def _run(todo: list, cfg: FilesConfig, rcfg: RayConfig, spec: ActorSpec, done: set, res: RayResult, log) -> None:
    t0 = time.perf_counter()
    ray = connect(rcfg.address, rcfg.num_cpus)
    batch = max(1, int(cfg.batch_size or READ_BATCH))
    n_batches = math.ceil(len(todo) / batch)
    res.actors = actors = actor_count(ray, rcfg, n_batches)
    log(f"explaining {len(todo)} image(s) on Ray with {actors} actor(s) of {rcfg.cpus_per_actor:g} CPU, "
        f"{batch} per batch")
    ds = ray.data.from_items([{"path": it.path, "stem": it.stem} for it in todo],
                             override_num_blocks=max(1, min(n_batches, actors * 8)))
    # Ray Data gives its actors max_restarts=-1 and max_task_retries=-1: a dead actor is replaced and
    # its batch run again (tests/test_cluster_explain.py kills one)
    env = reader_env([it.path for it in todo], rcfg.credentials)  # s3:// sources: the driver's AWS_* settings
    ds = ds.map_batches(ExplainActor, fn_constructor_args=(spec,), batch_size=batch, batch_format="numpy",
                        concurrency=actors, num_cpus=rcfg.cpus_per_actor,
                        **({"runtime_env": {"env_vars": env}} if env else {}))
    sink = ResultSink(os.path.join(cfg.out, RESULTS_DIR), done)
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not res.first_rows_s:
                res.first_rows_at = time.perf_counter()
                res.first_rows_s = res.first_rows_at - t0
                res.first_rows = len(table) // len(spec.methods)
            sink.add(table)
    finally:  # Ctrl-C or a lost driver: the rows received so far are kept
        sink.flush()
    per_image = len(spec.methods)
    res.explained = (sink.written - sink.errors) // per_image
    res.errors = sink.errors // per_image
    if sink.duplicates:
        res.notes.append(f"{sink.duplicates} row(s) of retried batches dropped as already written")


def summary_line(res: RayResult) -> str:
    parts = [f"explained {res.explained} image(s) with {', '.join(res.methods)} on Ray ({res.actors} actor(s)) "
             f"in {res.seconds:.1f}s"]
    if res.errors:
        parts.append(f"{res.errors} unreadable (rows with an error)")
    if res.already_done:
        parts.append(f"{res.already_done} already done")
    return "; ".join(parts) + f": overlays and predictions.csv in {res.out}, per-image results in {res.results}"


def bad_rows(folder: str) -> list:
    """'path: message' of every error row (one per image)."""
    from explicam.cluster.results import read_results

    tab = read_results(folder, ["path", "method", "error"])
    seen, out = set(), []
    for p, e in zip(tab.column("path").to_pylist(), tab.column("error").to_pylist()):
        if e is not None and p not in seen:
            seen.add(p)
            out.append(e)
    return out


def heatmaps_of(table) -> np.ndarray:
    """The heatmap column of results rows as an (N, h, w) float32 array (rows without errors)."""
    h, w = table.column("heatmap_h").to_pylist()[0], table.column("heatmap_w").to_pylist()[0]
    return np.asarray(table.column("heatmap").to_pylist(), np.float32).reshape(-1, h, w)


def ray_sources(paths, address: str):
    """`explain --ray photos/` works as `explain photos/ --ray`: an 'address' that is an
    existing file or folder is a source, and Ray is started here."""
    if address not in (None, "local", "auto") and os.path.exists(address):
        return (*paths, address), "local"
    return tuple(paths), address
