"""`python cli.py sweep ... --ray [ADDRESS]`: every (kernel, seed, size) run of the sweep
as one Ray task with its own resources, on run folders every node can see.

A thin scheduler for evaluate/scheduled.py: the plan and the per-run callable come from
the sweep, unchanged; this only places them. Each task gets a fresh worker process
(max_calls=1: TensorFlow's thread pools sized to the task's CPUs, its memory given back
after), and a worker that dies is retried (max_retries), which resumes the run from its
last epoch by the sweep's own rules. An error in a run (bad data, other settings in the
folder) is not retried; the other runs finish and the first error is raised at the end.
"""
from __future__ import annotations

import os

from explicam.cluster import connect


def _run_task(job, spec, cpus: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from explicam.train import quiet_tensorflow

    quiet_tensorflow()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus))
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    except RuntimeError:  # already initialised in this worker: keep its pools
        pass
    return job(spec, log=lambda m: print(m, flush=True))


def ray_scheduler(address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
                  max_retries: int = 3, log=print):
    """scheduler(plan, job) for run_sweep(..., scheduler=): one Ray task per planned run."""
    def schedule(plan, job):
        ray = connect(address)
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_calls=1, max_retries=max_retries,
                          retry_exceptions=False)(_run_task)
        log(f"[sweep] {len(plan)} run(s) as Ray tasks of {cpus_per_run:g} CPU"
            + (f" and {gpus_per_run:g} GPU" if gpus_per_run else "")
            + f" (cluster: {ray.cluster_resources().get('CPU', 0):g} CPU)")
        refs = {task.remote(job, spec, int(max(1, cpus_per_run))): i for i, spec in enumerate(plan)}
        pending, failure = list(refs), None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                kernel, run_dir, _ = plan[refs[ready[0]]]
                log(f"[sweep] kernel {kernel} in {run_dir} failed: {cause}")
                failure = failure or cause
                continue
            yield refs[ready[0]], results
        if failure is not None:
            raise failure
    return schedule
