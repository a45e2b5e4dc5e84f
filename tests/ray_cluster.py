"""One local Ray (2 CPUs) for the whole test session, shared by the cluster tests; skipped,
saying why, when the `cluster` extra is not installed."""
import os

import pytest


@pytest.fixture(scope="session")
def ray_address():
    ray = pytest.importorskip("ray", reason="the Ray tests need the cluster extra: pip install '.[cluster]'")
    pytest.importorskip("pyarrow", reason="the Ray tests need the cluster extra: pip install '.[cluster]'")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if ray.is_initialized():  # each test module that imports this fixture gets its own copy: one Ray for all
        yield ray.get_runtime_context().gcs_address
        return
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def descendants_named(part: str) -> list:
    """pids of Ray workers whose title holds `part` (Ray titles a worker 'ray::Class...'; a Ray
    Data actor is 'ray::MapWorker(...)') and that descend from this test process: only workers
    of the Ray this session started."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and part in title and _descends_from(int(pid), me):
            found.append(int(pid))
    return found


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(32):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False
