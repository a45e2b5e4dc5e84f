"""The per-image results of `explain --ray`: a Parquet dataset, OUT/results/part-*.parquet.

One row per (image, method): path, stem, method, the top-k classes and probabilities, the
target explained, the overlay written, the heatmap at feature resolution (min-max
normalised, row-major, heatmap_h x heatmap_w) and an error (null when the image was
explained). Load it with pandas.read_parquet("OUT/results") or Spark.

Rows are written only by the driver, keyed by (path, method): a batch that Ray retries
after a worker died, or a re-run, never adds a second row for an image. Each part file is
written under a temporary name and renamed, so a run stopped at any moment leaves whole
files; the next run reads their keys and explains only what is missing.
"""
from __future__ import annotations

import csv
import os
import time

RESULTS_DIR = "results"
ROWS_PER_PART = 4096


def schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("stem", pa.string()), ("method", pa.string()),
        ("classes", pa.list_(pa.string())), ("probabilities", pa.list_(pa.float32())),
        ("target", pa.string()), ("target_index", pa.int32()), ("output", pa.string()),
        ("heatmap", pa.list_(pa.float32())), ("heatmap_h", pa.int32()), ("heatmap_w", pa.int32()),
        ("error", pa.string()),
    ])


def rows_table(rows: list):
    """A list of row dicts -> a pyarrow Table with the results schema."""
    import pyarrow as pa

    sch = schema()
    return pa.table({name: [r.get(name) for r in rows] for name in sch.names}, schema=sch)


def _parts(folder: str) -> list:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith("part-") and f.endswith(".parquet"))


def read_results(folder: str, columns=None):
    """Every row written so far (pyarrow Table; empty with the schema when none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = _parts(folder)
    if not parts:
        tab = rows_table([])
        return tab.select(columns) if columns else tab
    return pa.concat_tables([pq.read_table(p, columns=columns, schema=None if columns else schema())
                             for p in parts])


def done_keys(folder: str) -> set:
    """(path, method) of every row already written, errors included."""
    tab = read_results(folder, ["path", "method"])
    return set(zip(tab.column("path").to_pylist(), tab.column("method").to_pylist()))


class ResultSink:
    """Rows in, whole Parquet part files out; drops any (path, method) already written."""

    def __init__(self, folder: str, seen: set, rows_per_part: int = ROWS_PER_PART):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.seen, self.rows_per_part = folder, seen, rows_per_part
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.pending, self.n_pending, self.seq = [], 0, 0
        self.written = self.errors = self.duplicates = 0

    def add(self, table) -> None:
        import pyarrow as pa

        keys = list(zip(table.column("path").to_pylist(), table.column("method").to_pylist()))
        keep = [i for i, k in enumerate(keys) if k not in self.seen]
        self.duplicates += len(keys) - len(keep)
        self.seen.update(keys[i] for i in keep)
        if keep:
            table = table.take(pa.array(keep)) if len(keep) < len(keys) else table
            self.pending.append(table.cast(schema()))
            self.n_pending += len(keep)
            self.errors += sum(e is not None for e in table.column("error").to_pylist())
        if self.n_pending >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.seq += 1
        path = os.path.join(self.folder, f"part-{self.run}-{self.seq:05d}.parquet")
        pq.write_table(table, path + ".partial")
        os.replace(path + ".partial", path)
        self.written += len(table)
        self.pending, self.n_pending = [], 0


def write_predictions_csv(folder: str, csv_path: str, top_k: int, order: dict) -> int:
    """predictions.csv as the one-machine explain writes it (file, class_i, prob_i, method,
    target, output), from every row explained so far, in input order; returns its rows."""
    tab = read_results(folder, ["path", "method", "classes", "probabilities", "target", "output", "error"])
    rows = [r for r in tab.to_pylist() if r["error"] is None]
    rows.sort(key=lambda r: (order.get(r["path"], len(order)), r["path"]))
    header = ["file"] + [c for i in range(1, top_k + 1) for c in (f"class_{i}", f"prob_{i}")] + \
             ["method", "target", "output"]
    with open(csv_path + ".partial", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            top = [v for name, p in zip(r["classes"], r["probabilities"]) for v in (name, f"{float(p):.6f}")]
            w.writerow([r["path"]] + top + [r["method"], r["target"], r["output"]])
    os.replace(csv_path + ".partial", csv_path)
    return len(rows)
