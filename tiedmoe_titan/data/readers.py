"""Reading the documents of one text file, streamed so that big files stay cheap.

* ``.txt``     - one document per blank-line-separated block;
* ``.jsonl``   - one document per line, in the line's ``"text"`` field;
* ``.parquet`` - one document per row of the ``text`` column;
* ``.jsonl.gz``, ``.jsonl.zst`` - compressed ``.jsonl``, as real corpora ship
  (read by ``tiedmoe-data tokenize``; training reads the first three).

:class:`DocumentReader` also tells how far into the file (in bytes on disk) it
has read, for progress lines and an ETA on compressed inputs.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator

from .sources import _SUFFIXES_TEXT

COMPRESSED_SUFFIXES = (".jsonl.gz", ".jsonl.zst")

PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: big files stream, never load whole


def iter_documents(path: str) -> Iterator[str]:
    """Yield the non-empty documents of one supported file in order."""
    return iter(DocumentReader(path))


class DocumentReader:
    """The documents of one file, in order; ``position`` is the bytes of the file
    on disk read so far (compressed bytes for ``.gz``/``.zst``; read-ahead makes it
    run a little ahead; a parquet file jumps to its size at the end)."""

    def __init__(self, path: str) -> None:
        if not path.endswith((".jsonl", ".txt", ".parquet", *COMPRESSED_SUFFIXES)):
            raise ValueError(f"'{path}' is not a {_SUFFIXES_TEXT} file")
        self.path = path
        self._raw: io.BufferedReader | None = None
        self._done = 0

    @property
    def position(self) -> int:
        if self._raw is not None and not self._raw.closed:
            return self._raw.tell()
        return self._done

    def __iter__(self) -> Iterator[str]:
        # A file that exists but cannot be decoded is a one-line error naming it.
        try:
            if self.path.endswith(".parquet"):
                yield from _iter_parquet_documents(self.path)
            else:
                with open(self.path, "rb") as raw:
                    self._raw = raw
                    text = text_stream(self.path, raw)
                    reader = _iter_txt_documents if self.path.endswith(".txt") else _iter_jsonl_documents
                    yield from reader(self.path, text)
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text ({e.reason}): convert it to UTF-8") from None
        except _damage_errors(self.path) as e:
            raise ValueError(f"{self.path}: cannot be read ({e})") from None
        self._done = os.path.getsize(self.path)


def _damage_errors(path: str) -> tuple[type[BaseException], ...]:
    """What reading an unreadable or damaged file of this kind raises."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)  # EOFError: a truncated .gz
    if path.endswith(".zst"):
        import zstandard

        errors += (zstandard.ZstdError,)
    return errors


def text_stream(path: str, raw: io.BufferedReader) -> io.TextIOWrapper:
    """UTF-8 text of a plain or compressed file, decompressed as it streams."""
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard  # a dependency; only .zst inputs need it

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _iter_txt_documents(path: str, f: io.TextIOWrapper) -> Iterator[str]:
    """Blank-line-separated blocks; lines are streamed so big files stay cheap."""
    block: list[str] = []
    for line in f:
        line = line.rstrip("\r\n")
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _iter_jsonl_documents(path: str, f: io.TextIOWrapper) -> Iterator[str]:
    """The ``"text"`` field of each line; blank lines and empty texts are skipped."""
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from None
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

    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
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
