"""Evaluation data from local files, in the formats the data sets are published in: JSON lines (optionally
gzipped, as HumanEval ships), a JSON list, CSV (with a header, or MMLU's original header-less rows), and
parquet (the Hugging Face hub's format; read with pyarrow when it is installed). Nothing is downloaded.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any


def read_records(path: str | Path, header: list[str] | None = None, flag: str = "--data") -> list[dict[str, Any]]:
    """The records of one file, as dicts. `header` names the columns of a header-less CSV; `flag` is the
    command-line option that names the file, for the error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (give a local file with {flag})")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _parquet(path)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith((".csv", ".csv.gz")):
            rows = list(csv.reader(f))
            keys, body = (header, rows) if header else (rows[0], rows[1:])
            return [dict(zip(keys, row, strict=False)) for row in body if row]
        text = f.read()
    if name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return records


def _parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to "
                         "JSONL") from None
    return pq.read_table(path).to_pylist()


def files_under(path: str | Path, patterns: tuple[str, ...]) -> list[Path]:
    """`path` itself if it is a file, else the files under it matching any pattern, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data {path} does not exist (give a local file or directory)")
    return sorted({p for pattern in patterns for p in path.rglob(pattern)})
