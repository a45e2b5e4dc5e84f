"""`python cli.py train ... --distribute ray`: one training run over several machines with
Ray Train's TensorflowTrainer.

    driver (here): the checks of a one-machine run (data folder, run folder settings,
            --fresh, already complete), then TensorflowTrainer: --workers workers of
            --cpus-per-worker / --gpus-per-worker, FailureConfig(--max-failures)
    worker: TF_CONFIG from Ray Train -> MultiWorkerMirroredStrategy (made first: it must
            exist before TensorFlow runs any op) -> train.fit's loop; --batch-size stays
            the global batch, each worker computing batch/workers images a step
    chief (rank 0): writes the run folder exactly as a one-machine run does, plus train.log
    others: resume from the run folder like the chief, write into a temp folder of their own
            (the MultiWorkerMirroredStrategy pattern: they save what the chief saves)

When a worker dies, Ray Train stops the group and starts a new one; every new worker
resumes from the run folder's last epoch by train.fit's rule (backup/state.json), so a
retry costs at most the epoch in progress. The run folder and --data must be paths every
node sees (a shared file system): the chief may land on any node. Ray Train keeps its own
small state in RUN_DIR/ray/.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace

from explicam.cluster import LOCAL

# Tests only: rank 1 exits once, right after the chief's first epoch checkpoint, if the
# marker file this names does not exist yet (it is created first, so the retry runs on).
CRASH_ONCE_ENV = "EXPLICAM_TEST_RAY_TRAIN_CRASH_ONCE"
LOG_NAME = "train.log"


@dataclass
class RayTrainConfig:
    """Where and how wide `train --distribute ray` runs (its options)."""
    address: str | None = None      # None/"local": a Ray started here; "auto": this machine's cluster; host:port
    workers: int = 2
    cpus_per_worker: float = 1.0    # also each worker's TensorFlow threads (rounded up)
    gpus_per_worker: float = 0.0
    max_failures: int = 3           # group restarts after a worker dies, each resuming from the last epoch


def require_ray_train():
    try:
        import ray.train  # noqa: F401 - ray[train] brings pydantic, which ray.train needs
    except ImportError:
        raise RuntimeError("--distribute ray needs Ray Train, which the base and [train] installs leave out: "
                           "pip install '.[cluster]' (or 'explicam[cluster]')") from None
    import ray

    return ray


def train_on_ray(cfg, rcfg: RayTrainConfig, run_dir: str, fresh: bool = False, log=print) -> dict:
    """Train (or resume, or recognise as complete) one run of `cfg` (train.fit.TrainConfig)
    on Ray Train; returns the summary the chief wrote into `run_dir`."""
    from explicam.train.lock import run_folder_lock

    if rcfg.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {rcfg.workers}")
    if rcfg.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be positive, got {rcfg.cpus_per_worker:g}")
    require_ray_train()
    cfg = replace(cfg, distribute="ray")  # each worker's model under its MultiWorkerMirroredStrategy
    run_dir = os.path.abspath(run_dir)  # the workers' working folders are not this one
    with run_folder_lock(run_dir, "train"):  # held here, by the driver: the chief writes under it
        from explicam.train import quiet_tensorflow

        quiet_tensorflow()  # ray.train.tensorflow imports it, here too
        summary = _already_complete(cfg, run_dir, fresh, log)
        return summary if summary is not None else _fit(cfg, rcfg, run_dir, log)


def _already_complete(cfg, run_dir: str, fresh: bool, log) -> dict | None:
    """The one-machine checks, here, before any worker starts (a worker's error would cost
    a Ray Train retry each): bad data, other settings in the folder, --fresh, complete."""
    from explicam.train.data import find_dataset
    from explicam.train.fit import _load_resume_state

    find_dataset(cfg.data, cfg.val_split, cfg.seed or 0)
    state = _load_resume_state(run_dir, cfg, fresh, log)  # --fresh empties the folder, RUN_DIR/ray/ too
    if state and state.get("complete"):
        log(f"{run_dir}: already complete ({state['epoch']} epochs); pass --fresh to train again")
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)
    return None


def _fit(cfg, rcfg: RayTrainConfig, run_dir: str, log) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from explicam.cluster import connect

    need = rcfg.workers * rcfg.cpus_per_worker
    local = rcfg.address in (None, "", LOCAL)
    # a local Ray gets at least what the workers ask for: trying --workers 2 on a 1-core laptop works
    connect(rcfg.address, max(os.cpu_count() or 1, math.ceil(need)) if local else None)
    have = ray.cluster_resources().get("CPU", 0)
    if have < need:
        raise RuntimeError(f"--workers {rcfg.workers} x --cpus-per-worker {rcfg.cpus_per_worker:g} needs "
                           f"{need:g} CPUs; the Ray cluster has {have:g}")
    resources = {"CPU": rcfg.cpus_per_worker, **({"GPU": rcfg.gpus_per_worker} if rcfg.gpus_per_worker else {})}
    log(f"[train] {rcfg.workers} Ray Train worker(s) of {rcfg.cpus_per_worker:g} CPU"
        + (f" and {rcfg.gpus_per_worker:g} GPU" if rcfg.gpus_per_worker else "")
        + f" (cluster: {have:g} CPU), global batch {cfg.batch_size}, up to {rcfg.max_failures} restart(s); "
        f"chief's log: {os.path.join(run_dir, LOG_NAME)}")
    loop_config = {
        "cfg": asdict(cfg), "run_dir": run_dir, "threads": max(1, math.ceil(rcfg.cpus_per_worker)),
        # unseeded runs: one shuffle order for every worker all the same, or the data shards
        # (every worker drops all but its share of each batch) would overlap
        "shuffle_seed": random.randrange(2**31), "crash_once": os.environ.get(CRASH_ONCE_ENV),
    }
    tf_log_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    trainer = TensorflowTrainer(
        _worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=rcfg.workers, use_gpu=rcfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ray", storage_path=run_dir,
                             failure_config=FailureConfig(max_failures=rcfg.max_failures),
                             # a cluster's raylets were started without the CLI's quieter TensorFlow
                             worker_runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": tf_log_level}}))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(f"training on Ray failed after {rcfg.max_failures} restart(s) (--max-failures); "
                           f"the same command resumes from the last epoch. {_cause(exc)}") from None
    error = (getattr(result, "return_value", None) or {}).get("error")
    if error:  # a ValueError in the workers (every worker hits it alike): no retry, the one line
        raise ValueError(error)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def _cause(exc: BaseException) -> str:
    """The first sentence of Ray's last line (the worker's own error, or why it died)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split(". ")[0].rstrip(".") + "."


def _worker(config: dict) -> dict:
    """One Ray Train worker: train.fit's loop under MultiWorkerMirroredStrategy."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from explicam.train import quiet_tensorflow

    quiet_tensorflow()
    import ray.train
    import tensorflow as tf

    from explicam.train.distribute import make_strategy
    from explicam.train.fit import TrainConfig, _train

    threads = config["threads"]
    tf.config.threading.set_intra_op_parallelism_threads(threads)  # the worker's share, not the node's
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    tf.get_logger().setLevel("WARNING")  # its INFO lines on every (re)start say what the chief's log says
    make_strategy("ray")  # first: the collectives are configured when TensorFlow starts
    cfg, run_dir = TrainConfig(**config["cfg"]), config["run_dir"]
    if cfg.seed is None:
        tf.random.set_seed(config["shuffle_seed"])
    rank = ray.train.get_context().get_world_rank()
    chief = rank == 0
    out = run_dir if chief else _worker_folder(run_dir, rank)
    if rank == 1 and config.get("crash_once"):
        _crash_once_after_first_epoch(config["crash_once"], run_dir)
    error = ""
    try:
        _train(cfg, run_dir, False, 2 if chief else 0, _chief_log(run_dir) if chief else _quiet,
               out_dir=None if chief else out)
    except ValueError as exc:  # bad data / settings: the same on every worker, retrying cannot help
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        if not chief:
            shutil.rmtree(out, ignore_errors=True)
    return {"error": error}  # rank 0's comes back to the driver as the result's return_value


def _worker_folder(run_dir: str, rank: int) -> str:
    """This node's throwaway folder for `rank` of this run, emptied first: a worker that died
    (a disk cache in it, perhaps) leaves nothing behind past the next start."""
    key = hashlib.sha1(run_dir.encode()).hexdigest()[:8]
    path = os.path.join(tempfile.gettempdir(), f"explicam-worker-{key}-rank{rank}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _quiet(*_args, **_kw):
    pass


def _chief_log(run_dir: str):
    path = os.path.join(run_dir, LOG_NAME)

    def log(msg):
        # to the driver's terminal through Ray; not print(), which Ray Train also copies to its logger
        sys.stdout.write(msg + "\n")
        sys.stdout.flush()
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
    return log


def _crash_once_after_first_epoch(marker: str, run_dir: str) -> None:
    if os.path.exists(marker):
        return
    state_path = os.path.join(run_dir, "backup", "state.json")

    def watch():
        while True:
            try:
                with open(state_path) as f:
                    if json.load(f).get("epoch", 0) >= 1:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        open(marker, "w").close()
        os._exit(1)  # like a killed process: no cleanup, no exception for Ray to report

    threading.Thread(target=watch, daemon=True).start()
