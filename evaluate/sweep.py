"""`python cli.py sweep`: the seed study's kernel-size experiment, reproduced and measured.

For each kernel: train with the seed's settings (train.fit resumes an interrupted run and
returns at once for a finished one), export to ONNX (skipped when model.onnx is newer than
model.keras), evaluate (skipped when eval/metrics.json holds the same settings and is
newer than the model), then rewrite the report with every kernel finished so far. Every
step writes atomically, so the sweep can be stopped at any moment and the same command
carries on where it stopped.

While a kernel trains, a watcher thread reads the run's resume state after each epoch and
prints the time left for the whole sweep, estimated from the measured seconds per epoch
scaled by each kernel's multiply-accumulates (~K^2): an upper bound, since early
stopping usually ends runs sooner.

    from explicam.evaluate.sweep import run_report
    run_report("data/synth", ["runs/k4"], out="report", methods=["gradcam", "gradcam++", "layercam"], limit=60)
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import threading
import time

from explicam.evaluate.evaluate import EvalConfig, run_evaluation
from explicam.evaluate.grid import SweepGrid, grid_plan
from explicam.evaluate.report import load_examples, write_report
from explicam.train.lock import hold_run_folders

CHANNELS = (3, 16, 32, 64, 128, 256)


def conv_macs(kernel: int, size: int) -> int:
    """Multiply-accumulates of the five convolutions for one image (what the time scales with)."""
    return sum((size >> i) ** 2 * CHANNELS[i] * CHANNELS[i + 1] * kernel * kernel for i in range(5))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_state(run_dir: str) -> dict | None:
    return _read_json(os.path.join(run_dir, "backup", "state.json"))


def is_complete(run_dir: str, cfg) -> bool:
    """A finished run with these settings (summary.json written, same fingerprint)."""
    from explicam.train.fit import TrainConfig

    state = run_state(run_dir)
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if state is not None:
        return bool(state.get("complete")) and state.get("fingerprint") == cfg.fingerprint() and summary is not None
    try:
        return summary is not None and TrainConfig(**summary["config"]).fingerprint() == cfg.fingerprint()
    except (KeyError, TypeError):
        return False


def check_runs(plan: list) -> None:
    """Refuse before any work when a run folder holds a run with other settings."""
    for kernel, run_dir, cfg in plan:
        state = run_state(run_dir)
        other = state is not None and state.get("fingerprint") != cfg.fingerprint()
        orphan = state is None and os.path.exists(os.path.join(run_dir, "summary.json")) and not is_complete(run_dir, cfg)
        if other or orphan:
            what = (state or {}).get("config_text", "unknown settings")
            raise ValueError(f"{run_dir} holds a kernel-{kernel} run with other settings ({what}); "
                             "pass --runs-dir DIR to keep this sweep's runs elsewhere")


class Eta:
    """Seconds per epoch and per evaluation, measured, and scaled between kernels by MACs."""

    def __init__(self, plan, size, eval_images):
        self.plan, self.size, self.eval_images = plan, size, eval_images
        self.epoch_cost, self.eval_cost = {}, {}  # run folder -> seconds per epoch / per evaluation
        # every run's multiply-accumulates (kernel and image size), to scale between runs
        self.macs = {run_dir: conv_macs(kernel, getattr(cfg, "image_size", size)) for kernel, run_dir, cfg in plan}

    def measure(self):
        for kernel, run_dir, _ in self.plan:
            st = run_state(run_dir)
            if st and st.get("epoch"):
                self.epoch_cost[run_dir] = st["wall_time_s"] / st["epoch"]
            res = _read_json(os.path.join(run_dir, "eval", "metrics.json"))
            if res and res.get("total_s"):
                self.eval_cost[run_dir] = res["total_s"]

    def _scaled(self, table, run_dir):
        if run_dir in table:
            return table[run_dir]
        if not table:
            return None
        ref = min(table, key=lambda r: abs(math.log(self.macs[r] / self.macs[run_dir])))
        return table[ref] * self.macs[run_dir] / self.macs[ref]

    def left(self, done: set) -> str:
        """'~12 min' (upper bound) or 'estimated after the first epoch'."""
        self.measure()
        total = 0.0
        for kernel, run_dir, cfg in self.plan:
            if run_dir in done:
                continue
            st = run_state(run_dir) or {}
            if not st.get("complete"):
                per_epoch = self._scaled(self.epoch_cost, run_dir)
                if per_epoch is None:
                    return "estimated after the first epoch"
                total += max(0, cfg.max_epochs - st.get("epoch", 0)) * per_epoch
            per_eval = self._scaled(self.eval_cost, run_dir)
            total += per_eval if per_eval is not None else 0.0
        return f"~{total / 60:.0f} min at most" if total >= 60 else f"~{total:.0f} s at most"


class EpochWatcher(threading.Thread):
    """Prints progress and the sweep's time left each time the run finishes an epoch."""

    def __init__(self, kernel, run_dir, cfg, eta, done, log, poll=2.0):
        super().__init__(daemon=True)
        self.kernel, self.run_dir, self.cfg, self.eta, self.done, self.log = kernel, run_dir, cfg, eta, done, log
        self.poll, self.stop = poll, threading.Event()
        self.seen = (run_state(run_dir) or {}).get("epoch", 0)

    def run(self):
        while not self.stop.wait(self.poll):
            st = run_state(self.run_dir) or {}
            if st.get("epoch", 0) > self.seen:
                self.seen = st["epoch"]
                self.log(f"[sweep] k{self.kernel}: epoch {self.seen}/{self.cfg.max_epochs} "
                         f"({st['wall_time_s'] / self.seen:.1f}s/epoch); sweep time left: {self.eta.left(self.done)}")


def ensure_export(run_dir: str, log=print) -> str:
    onnx, keras_file = os.path.join(run_dir, "model.onnx"), os.path.join(run_dir, "model.keras")
    if os.path.isfile(onnx) and (not os.path.isfile(keras_file) or os.path.getmtime(onnx) >= os.path.getmtime(keras_file)):
        return onnx
    from explicam.export.run import export_model

    return export_model(run_dir=run_dir, log=log)["onnx"]


def ensure_evaluation(onnx: str, data: str, cfg: EvalConfig, log=print) -> dict:
    out = os.path.join(os.path.dirname(onnx), "eval")
    saved = _read_json(os.path.join(out, "metrics.json"))
    fresh = (saved is not None and saved.get("settings") == cfg.key() and saved.get("data") == os.path.abspath(data)
             and os.path.isfile(os.path.join(out, "examples.npz"))
             and os.path.getmtime(os.path.join(out, "metrics.json")) >= os.path.getmtime(onnx))
    if fresh:
        log(f"  {out}: evaluation up to date, reused")
        return {**saved, "out": out}
    return run_evaluation(onnx, data, cfg, out=out, log=log)


def _history(run_dir: str) -> list:
    path = os.path.join(run_dir, "history.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def report_entry(kernel: int, run_dir: str, results: dict) -> dict:
    curves = os.path.join(run_dir, "curves.png")
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary is None:
        raise ValueError(f"{run_dir} has no summary.json: train it to the end first")
    config = summary.get("config") or {}
    return {"kernel": kernel, "summary": summary, "history": _history(run_dir), "results": results,
            "examples": load_examples(os.path.join(results["out"], "examples.npz")),
            "curves": curves if os.path.isfile(curves) else None,
            # the run's point in a grid sweep (evaluate/grid.py, evaluate/study.py)
            "run_dir": run_dir, "seed": config.get("seed"), "size": summary.get("image_size", results["input_size"]),
            "data": summary.get("data", results.get("data"))}


def _command() -> str:
    return "python cli.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_report(data: str, run_dirs=("runs/k4",), out: str = "report", methods=None, limit: int | None = None,
               eval_cfg: EvalConfig | None = None, log=print, command: str | None = None) -> str:
    """A report of finished runs (no training): export and evaluate each when needed,
    then write out/index.html and out/report.md. Returns the HTML path. The demo calls
    run_report("data/synth", ["runs/k4"], methods=[...], limit=...)."""
    cfg = eval_cfg or EvalConfig(methods=list(methods) if methods else None, limit=limit)
    entries = []
    for run_dir in run_dirs:
        onnx = ensure_export(run_dir, log)
        results = ensure_evaluation(onnx, data, cfg, log)
        entries.append(report_entry(int(results["kernel"]), run_dir, results))
    size = entries[0]["results"]["input_size"] if entries else 0
    return write_report(out, entries, {"data": data, "image_size": size, "command": command or _command()})


def parse_kernels(text: str) -> list:
    try:
        kernels = [int(k) for k in str(text).replace(" ", "").split(",") if k]
    except ValueError:
        raise ValueError(f"--kernels must be integers separated by commas, e.g. 2,4,8; got {text!r}") from None
    if not kernels or any(k < 1 for k in kernels) or len(set(kernels)) != len(kernels):
        raise ValueError(f"--kernels must list distinct positive integers, got {text!r}")
    return kernels


def sweep_run_dirs(runs_dir: str, kernels, head: str = "flatten") -> list:
    """The run folder of each kernel: RUNS_DIR/k{K} (k{K}_gap for the gap head)."""
    from explicam.train.fit import default_run_dir

    return [os.path.join(runs_dir, os.path.basename(default_run_dir(k, head))) for k in kernels]


def run_sweep(data: str, kernels, make_config, eval_cfg: EvalConfig, runs_dir: str = "runs", out: str = "report",
              log=print, command: str | None = None, grid: SweepGrid | None = None, scheduler=None) -> str:
    """Train, export and evaluate every kernel (skipping what is done), then report.
    make_config(kernel) -> train.fit.TrainConfig. Returns the report's HTML path.
    grid: seeds, image sizes and datasets per kernel (evaluate/grid.py); make_config then
    also takes the overrides image_size=, seed=, data=.
    Every run folder is locked for the whole sweep: a second sweep stops at once.
    scheduler: run the plan elsewhere, e.g. on Ray (evaluate/scheduled.py)."""
    if grid is None:
        configs = {k: make_config(k) for k in kernels}
        plan = [(k, sweep_run_dirs(runs_dir, [k], c.head)[0], c) for k, c in configs.items()]
    else:
        plan = grid_plan(runs_dir, kernels, grid, make_config)
    if scheduler is not None:  # the runs placed elsewhere (cluster/sweep.py); each locks its own folder
        from explicam.evaluate.scheduled import scheduled_sweep

        return scheduled_sweep(plan, data, eval_cfg, out, log, command or _command(), scheduler)
    with hold_run_folders([run_dir for _, run_dir, _ in plan], "sweep"):
        return _run_plan(plan, data, eval_cfg, out, log, command)


def _run_plan(plan: list, data: str, eval_cfg: EvalConfig, out: str, log, command) -> str:
    from explicam.train.fit import result_line, train

    check_runs(plan)
    eta = Eta(plan, plan[0][2].image_size, eval_cfg.limit)
    done, entries, command = set(), [], command or _command()
    for i, (kernel, run_dir, cfg) in enumerate(plan, start=1):
        complete = is_complete(run_dir, cfg)
        log(f"[sweep] kernel {kernel} ({i}/{len(plan)}) in {run_dir}: "
            f"{'training complete, reused' if complete else 'training'}; sweep time left: {eta.left(done)}")
        if not complete:
            watcher = EpochWatcher(kernel, run_dir, cfg, eta, done, log)
            watcher.start()
            try:
                summary = train(cfg, run_dir=run_dir, verbose=2, log=log)
            finally:
                watcher.stop.set()
            log(result_line(summary))
        t0 = time.time()
        results = ensure_evaluation(ensure_export(run_dir, log), getattr(cfg, "data", data), eval_cfg, log)
        done.add(run_dir)
        entries.append(report_entry(kernel, run_dir, results))
        path = write_report(out, entries, {"data": data, "image_size": cfg.image_size, "command": command})
        log(f"[sweep] kernel {kernel} done ({time.time() - t0:.0f}s export + evaluation); report so far: {path}")
    return path
