"""Writing a dataset folder safely: never over someone's files, never half-written.

Shared by the built-in dataset (train/synth.py) and the converters (train/fashion_mnist.py):
the images go to OUT.partial, which replaces OUT only once everything is written.
"""
from __future__ import annotations

import os
import shutil

import cv2


def prepare_target(out_dir: str, force: bool) -> None:
    """Refuse to overwrite a non-empty out_dir unless forced; never delete a parent of cwd."""
    if not os.path.lexists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return
    if not force:
        raise FileExistsError(f"output folder {out_dir!r} exists and is not empty (use --force to replace it)")
    # --force on a typo like "." or "~" must not wipe the project or the home folder.
    cwd, protected = os.getcwd(), (os.path.abspath(os.sep), os.path.expanduser("~"))
    if out_dir in protected or cwd == out_dir or cwd.startswith(out_dir + os.sep):
        raise ValueError(f"refusing to delete {out_dir!r}: it is /, home or holds the current folder")


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def write_rgb(root: str, rel: str, rgb, params=()) -> None:
    """Write an RGB uint8 image (cv2 writes BGR) or a 2-D mask under root; raise if it fails."""
    img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    if not cv2.imwrite(os.path.join(root, rel), img, list(params)):
        raise OSError(f"could not write {rel} under {root!r}")


def publish(partial: str, out_dir: str) -> None:
    """Replace out_dir by the finished partial folder (the old one stays until now)."""
    remove_path(out_dir)
    os.rename(partial, out_dir)
