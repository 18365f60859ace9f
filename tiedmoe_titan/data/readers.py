"""Reading the documents of one text file, streamed so that big files stay cheap.

* ``.txt``     - one document per blank-line-separated block;
* ``.jsonl``   - one document per line, in the line's ``"text"`` field;
* ``.parquet`` - one document per row of the ``text`` column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from .sources import _SUFFIXES_TEXT

PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: big files stream, never load whole


def iter_documents(path: str) -> Iterator[str]:
    """Yield the non-empty documents of one supported file in order."""
    if path.endswith(".jsonl"):
        yield from _iter_jsonl_documents(path)
    elif path.endswith(".txt"):
        yield from _iter_txt_documents(path)
    elif path.endswith(".parquet"):
        yield from _iter_parquet_documents(path)
    else:
        raise ValueError(f"'{path}' is not a {_SUFFIXES_TEXT} file")


def _iter_txt_documents(path: str) -> Iterator[str]:
    """Blank-line-separated blocks; lines are streamed so big files stay cheap."""
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _iter_jsonl_documents(path: str) -> Iterator[str]:
    """The ``"text"`` field of each line; blank lines and empty texts are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})"
                ) from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: 'text' is not a string")
            if text.strip():
                yield text


def _iter_parquet_documents(path: str) -> Iterator[str]:
    """The ``text`` column, row by row; null and empty texts are skipped.

    Only that column is read, a batch of rows at a time within each row group,
    so a file much bigger than memory streams through.
    """
    import pyarrow.parquet as pq  # comes with `datasets`; only parquet users need it

    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise ValueError(f"{path}: no 'text' column (it has: {', '.join(columns)})")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"{path}: the 'text' column holds {type(text).__name__}, not strings")
            if text.strip():
                yield text
