"""`python cli.py dataset fashion-mnist`: Debian's Fashion-MNIST as a dataset folder (train/fashion_mnist.py)."""
from __future__ import annotations

import click

from explicam.console import Progress, friendly


@click.command("fashion-mnist")
@click.option("--out", required=True, type=click.Path(), help="Folder to create.")
@click.option("--size", default=32, show_default=True, help="Image side in pixels (a multiple of 32 to train).")
@click.option("--limit", type=int, default=None, help="Training images per class, the first in file order "
              "[default: all 6,000].")
@click.option("--val-limit", type=int, default=None, help="Validation (test-split) images per class "
              "[default: --limit / 6, the dataset's own ratio; all 1,000 without --limit].")
@click.option("--source", default=None, type=click.Path(),
              help="Folder of the four idx files [default: /usr/share/datasets/fashion-mnist].")
@click.option("--masks/--no-masks", default=True, show_default=True, help="Write object masks (the garment).")
@click.option("--force", is_flag=True, help="Replace the folder if it exists.")
@friendly
def fashion_mnist(out, size, limit, val_limit, source, masks, force):
    """Convert Fashion-MNIST (apt-get install dataset-fashion-mnist) to training/ and validation/ PNG folders."""
    from explicam.train import fashion_mnist as fm

    cfg = fm.FashionConfig(out=out, size=size, limit=limit, val_limit=val_limit, source=source or fm.SOURCE,
                           masks=masks, force=force)
    with Progress(1, "converting") as bar:
        def progress(done, total):
            bar.bar.length = total
            bar(done, total)
        info = fm.convert(cfg, progress=progress)
    click.echo(f"wrote {info['n_train']} training and {info['n_val']} validation images of 10 classes "
               f"({size} px, RGB{', with masks' if masks else ''}) to {out} in {info['seconds']:.1f}s")
