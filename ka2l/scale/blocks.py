"""A Ray run's work folder: the pool as Parquet in, result blocks as Parquet out, Ray Data's checkpoint.

    <data dir>/scale/run-12/
        input/pool.parquet        question_id, row (its place in the pool), question, golds: the questions left to do
        output/<block>*.parquet   one file per written block, every column the actors added
        checkpoint/<block>.parquet           the question ids of a block whose output file is complete
        checkpoint/<block>.pending.parquet   a block being written (Ray removes it and its output on the next start)

A block counts as done once its checkpoint is committed (Ray's two-phase commit renames the pending file
after the output file is written), so only committed blocks are read back. For a cluster of several
machines the data folder must be on storage every node sees (e.g. NFS), as Ray Data's file checkpoints need.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..paths import data_dir

PENDING = ".pending.parquet"


class WorkDir:
    def __init__(self, run_id: int):
        self.root = data_dir() / "scale" / f"run-{int(run_id)}"
        self.input, self.output, self.checkpoint = self.root / "input", self.root / "output", self.root / "checkpoint"

    def write_input(self, questions: list[dict[str, Any]], positions: list[int]) -> None:
        """The questions at ``positions`` of the pool (its order), replacing any earlier input."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.input.mkdir(parents=True, exist_ok=True)
        table = pa.table({"question_id": pa.array([int(questions[i]["id"]) for i in positions], pa.int64()),
                          "row": pa.array(positions, pa.int64()),
                          "question": pa.array([questions[i]["question"] for i in positions], pa.string()),
                          "golds": pa.array([json.dumps(list(questions[i]["answers"] or [])) for i in positions], pa.string())})
        tmp = self.root / "pool.parquet.partial"
        pq.write_table(table, tmp)
        tmp.replace(self.input / "pool.parquet")

    def committed(self) -> list[str]:
        """The names of the blocks whose output is complete, oldest first."""
        if not self.checkpoint.is_dir():
            return []
        files = [p for p in self.checkpoint.glob("*.parquet") if not p.name.endswith(PENDING)]
        return [p.name[: -len(".parquet")] for p in sorted(files, key=lambda p: (p.stat().st_mtime, p.name))]

    def block_rows(self, name: str) -> int:
        """Questions in committed block ``name`` (from its checkpoint file's metadata, no data read)."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.checkpoint / f"{name}.parquet").metadata.num_rows

    def read_block(self, name: str) -> Iterator[Any]:
        """The output rows of committed block ``name``, as pandas frames (one per file Ray wrote for it)."""
        import pyarrow.parquet as pq

        for path in sorted(self.output.glob(f"{name}*.parquet")):
            yield pq.read_table(path).to_pandas()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
