"""One run folder, one writer: an OS file lock held by `train` and `sweep`.

Two processes training into the same folder would interleave their checkpoints and
resume state; the second one is stopped before it touches anything, with a line naming
the folder and the process holding it. The lock is flock(2) on `<run>/.lock` (Windows:
msvcrt.locking): the kernel drops it when the holder exits, however it exits (SIGKILL,
power cut of a container, OOM), so there is never a stale lock to clean up by hand. The
file itself stays; only the lock on it matters, and its content (the holder's PID) is
only for the message.

Imports nothing heavy (no TensorFlow): the CLI takes the lock before loading anything, so
the second process stops at once.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

LOCK_NAME = ".lock"
_held: dict = {}                 # realpath -> depth: re-entrant within one process
_guard = threading.Lock()


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder."""


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: str) -> str:
    """The PID written by the holder ('?' if it has not written it yet)."""
    for _ in range(20):  # the holder writes its PID just after locking: give it a moment
        try:
            with open(path) as f:
                text = f.read().split()
        except OSError:
            text = []
        if text:
            return text[0]
        time.sleep(0.01)
    return "?"


@contextlib.contextmanager
def hold_run_folders(run_dirs, what: str = "sweep"):
    """run_folder_lock on every folder, all or none."""
    with contextlib.ExitStack() as held:
        for run_dir in run_dirs:
            held.enter_context(run_folder_lock(run_dir, what))
        yield


@contextlib.contextmanager
def run_folder_lock(run_dir: str, what: str = "train"):
    """Hold `run_dir` for this process; RunFolderBusy at once when another one holds it.
    Re-entrant: the CLI takes it before TensorFlow loads, train() and the sweep again."""
    created = _missing(run_dir)  # the folders this call makes, deepest first
    os.makedirs(run_dir, exist_ok=True)
    key = os.path.realpath(run_dir)
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        os.close(fd)
        raise RunFolderBusy(f"{run_dir}: in use by another explicam process (PID {_holder(path)}); "
                            "wait for it to finish, or stop it, then run this again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        with _guard:
            _held[key] = 1
        yield
    finally:
        with _guard:
            _held.pop(key, None)
        try:
            if created and os.listdir(run_dir) == [LOCK_NAME]:
                # a run that stopped before writing anything (bad data, bad option) leaves no folder
                os.remove(path)
                for folder in created:
                    os.rmdir(folder)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the lock


def _missing(run_dir: str) -> list:
    folders, folder = [], os.path.abspath(run_dir)
    while not os.path.isdir(folder):
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


def remove_contents_but_lock(run_dir: str) -> None:
    """`--fresh`: empty the folder but keep the lock file, whose lock this process holds
    (deleting it would let a second process lock a new file of the same name)."""
    import shutil

    for name in os.listdir(run_dir):
        if name == LOCK_NAME:
            continue
        path = os.path.join(run_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
