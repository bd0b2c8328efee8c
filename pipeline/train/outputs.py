"""The run folder's small files — metrics.jsonl, markers, the export — on a local path or object storage.

In:  the run folder `<storage_path>/<run_name>` (a local/shared path or an `s3://` / `gs://` URL) and
     the worker's rank.
Out: `RunFiles.metrics_path`, a local file the metrics log appends to (the run folder's own file when
     it is local; a local mirror of `<run>/metrics.jsonl` otherwise, seeded from the stored one so a
     resumed run keeps the earlier lines, and uploaded by `sync()` at every checkpoint and at the end);
     `has` / `put` for marker files; `export_to(target, write)` runs `write(local_folder)` and puts the
     result at `target` (uploaded when remote). Only rank 0 writes anything.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline.sources.staging import _fs, copy_out, is_remote, join

METRICS = "metrics.jsonl"
CURVE_FILE = "curve.json"  # `fluid bench curve`: what training bought, by training minutes


class RunFiles:
    def __init__(self, run_dir: str, rank: int = 0):
        self.run_dir, self.rank, self.remote = str(run_dir), rank, is_remote(run_dir)
        if not self.remote:
            self.metrics_path = Path(self.run_dir.removeprefix("file://")) / METRICS
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="fluid-run-")
        self.metrics_path = Path(self._tmp.name) / METRICS
        if rank == 0:
            fs, base = _fs(join(self.run_dir, METRICS))
            if fs.exists(base):
                fs.get_file(base, str(self.metrics_path))

    def sync(self) -> None:
        """Upload the metrics mirror (remote run folders; a no-op otherwise and on ranks ≠ 0)."""
        if self.remote and self.rank == 0 and self.metrics_path.is_file():
            fs, base = _fs(join(self.run_dir, METRICS))
            fs.put_file(str(self.metrics_path), base)

    def has(self, name: str) -> bool:
        fs, base = _fs(join(self.run_dir, name))
        return fs.exists(base)

    def put(self, name: str, text: str) -> None:
        fs, base = _fs(join(self.run_dir, name))
        fs.makedirs(base.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(base, text.encode())


def export_to(target: str, write: Callable[[Path], object]) -> str:
    """`write(folder)` into `target` directly when it is local, else into a temporary folder then uploaded.
    `write` returns a falsy value on ranks that wrote nothing (then nothing is uploaded)."""
    if not is_remote(target):
        write(Path(target.removeprefix("file://")))
        return target
    with tempfile.TemporaryDirectory(prefix="fluid-export-") as tmp:
        out = Path(tmp) / "export"
        if write(out):
            copy_out(out, target)
    return target
