"""The sweep with its runs scheduled elsewhere (cluster/sweep.py: each run a Ray task).

`run_sweep(..., scheduler=s)` hands the plan and one callable per run to `s` instead of
running them one after another here; the scheduler yields (plan index, evaluation results)
as runs finish, in any order, and the report is rewritten after each. The rules stay the
sweep's: a finished run is reused, an interrupted one resumes (train.fit), a fresh export
or evaluation is skipped (evaluate/sweep.py), and each run holds its own folder's lock
while it works, wherever it runs.

    scheduler(plan, job) -> iterator of (index, results); job(spec, log=print) -> results
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import replace

from explicam.evaluate.evaluate import EvalConfig
from explicam.evaluate.report import write_report


def run_one(spec, data: str, eval_cfg: EvalConfig, log=print) -> dict:
    """Train (or reuse, or resume), export and evaluate one planned run (kernel, run_dir, cfg)."""
    from explicam.evaluate.sweep import ensure_evaluation, ensure_export, is_complete
    from explicam.train.fit import result_line, train
    from explicam.train.lock import run_folder_lock

    kernel, run_dir, cfg = spec
    with run_folder_lock(run_dir, "sweep"):
        if not is_complete(run_dir, cfg):
            log(f"[sweep] kernel {kernel} in {run_dir}: training")
            log(result_line(train(cfg, run_dir=run_dir, verbose=2, log=log)))
        return ensure_evaluation(ensure_export(run_dir, log), getattr(cfg, "data", data), eval_cfg, log)


def scheduled_sweep(plan: list, data: str, eval_cfg: EvalConfig, out: str, log, command: str, scheduler) -> str:
    from explicam.evaluate.sweep import check_runs, report_entry

    check_runs(plan)
    # absolute paths: a task's worker may start in another folder, or on another node
    plan = [(k, os.path.abspath(run_dir), replace(cfg, data=os.path.abspath(cfg.data))) for k, run_dir, cfg in plan]
    data = os.path.abspath(data)
    job = functools.partial(run_one, data=data, eval_cfg=eval_cfg)
    entries, path, t0 = {}, None, time.time()
    for i, results in scheduler(plan, job):
        kernel, run_dir, cfg = plan[i]
        entries[i] = report_entry(kernel, run_dir, results)
        path = write_report(out, [entries[j] for j in sorted(entries)],
                            {"data": data, "image_size": cfg.image_size, "command": command})
        log(f"[sweep] kernel {kernel} in {run_dir} done ({len(entries)}/{len(plan)} after {time.time() - t0:.0f}s); "
            f"report so far: {path}")
    return path
