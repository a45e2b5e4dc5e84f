"""What `explain --ray` explains: folders, globs and files as the one-machine path reads
them (runtime/files.collect), or tables (CSV / Parquet) with a column of image paths or
URIs, read through pyarrow (local files, s3://, gs:// ... as pyarrow's filesystems know them).
"""
from __future__ import annotations

import glob
import os

from explicam.runtime.files import Item, collect
from explicam.runtime.images import ImageError, decode_image, read_image

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# what pyarrow's S3 file system takes from the environment: credentials, region, endpoint
# Where the store is: handed to the actors whenever a source is a URI.
S3_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
# Secrets: only with --ray-credentials, since Ray shows a job's runtime_env to anyone who can see
# its dashboard or state API; by default each node uses its own (instance role, ~/.aws, env).
S3_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def uri_path(src: str) -> str:
    """A URI without its query string (s3://b/k.jpg?endpoint_override=... -> s3://b/k.jpg):
    what names it; the query only tells pyarrow how to reach it. Local paths unchanged."""
    return src.split("?", 1)[0] if "://" in src else src


def table_format(src: str) -> str | None:
    ext = os.path.splitext(uri_path(src).rstrip("/"))[1].lower()
    return TABLE_SUFFIXES.get(ext)


def read_path_column(src: str, column: str) -> list:
    """The image paths in one column of a CSV or Parquet file (or a Parquet folder)."""
    import pyarrow.dataset as pads

    fmt = table_format(src) or "parquet"
    try:
        table = pads.dataset(src, format=fmt).to_table(columns=[column])
    except (KeyError, ValueError) as exc:
        if column not in str(exc) and "No match" not in str(exc):
            raise ValueError(f"{src}: cannot read it as {fmt} ({str(exc).splitlines()[0]})") from None
        names = pads.dataset(src, format=fmt).schema.names
        raise ValueError(f"{src}: no column '{column}' (columns: {', '.join(names)}); "
                         "name it with --path-column") from None
    except (OSError, TypeError) as exc:
        raise ValueError(f"{src}: cannot read it as {fmt} ({str(exc).splitlines()[0]})") from None
    base = os.path.dirname(os.path.abspath(src)) if "://" not in src else None
    paths = []
    for p in table.column(column).to_pylist():
        if p is None or str(p).strip() == "":
            continue
        p = str(p).strip()
        # a relative path in a local table is relative to the table's folder
        paths.append(p if "://" in p or os.path.isabs(p) or base is None else os.path.join(base, p))
    return paths


class _Stems:
    """Output names unique across all sources, as runtime/files.collect makes them."""

    def __init__(self, items):
        self.used = {it.stem.lower() for it in items}

    def __call__(self, stem: str) -> str:
        key, n = stem.lower(), 1
        while key in self.used:
            n += 1
            key = f"{stem}_{n}".lower()
        self.used.add(key)
        return stem if n == 1 else f"{stem}_{n}"


def collect_sources(sources, out: str | None, path_column: str = "path") -> tuple[list, list]:
    """(items, problems): files and folders as `explain` walks them, globs expanded, tables
    read for their path column. A table's row whose file is missing stays an item: the run
    gives it a row with an error, like any bad image."""
    plain, tables, problems = [], [], []
    for src in map(os.fspath, sources):
        if table_format(src) and (os.path.isfile(src) or "://" in src or os.path.isdir(src)):
            tables.append(src)
        elif not os.path.exists(src) and glob.has_magic(src):
            found = sorted(glob.glob(src, recursive=True))
            plain += found
            if not found:
                problems.append(f"{src}: no file matches")
        else:
            plain.append(src)
    items, more = collect(plain, out) if plain else ([], [])
    problems += more
    stems, seen = _Stems(items), {it.path for it in items}
    for src in tables:
        for path in read_path_column(src, path_column):
            if path not in seen:
                seen.add(path)
                name = uri_path(path).rstrip("/").rsplit("/", 1)[-1]
                items.append(Item(path, stems(os.path.splitext(name)[0] or "image")))
    return items, problems


def reader_env(paths, credentials: bool = False) -> dict:
    """The driver's S3 settings (S3_ENV, and S3_SECRETS when `credentials`) for the actors,
    when any path is a URI: a node started without them then reads what the driver can.
    {} for local paths."""
    if not any("://" in p for p in paths):
        return {}
    names = S3_ENV + (S3_SECRETS if credentials else ())
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def read_any(path: str, min_side: int = 0):
    """An image from a local path or a URI pyarrow can open; ImageError names the file."""
    if "://" not in path:
        return read_image(path, min_side=min_side)
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            data = f.read()
    except Exception as exc:  # pyarrow's filesystems raise OSError, ArrowInvalid, ...
        raise ImageError(f"{path}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
            from None
    return decode_image(data, path, min_side=min_side)
