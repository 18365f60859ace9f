"""Parsing ``dataset_path`` into weighted sources of files.

``training.dataset_path`` (or ``validation.dataset_path``) lists globs, separated
by commas, of text files (``.txt``, ``.jsonl``, ``.parquet``) and of token-shard
folders (``tiedmoe-data tokenize`` output: a folder with a ``metadata.json``; the
glob may name the folder or its ``metadata.json``).  Plain globs (``"corpus/*.jsonl,notes/*.txt"``) make one
source.  For a weighted mixture, start each source with ``NAME=WEIGHT:``; a glob
without the prefix belongs to the source before it::

    web=0.7:/data/web/*.jsonl,/data/web2/*.jsonl,code=0.3:/data/code/*.parquet

NAME is a word (letters, digits, ``_ . -``), WEIGHT a positive number; weights
are relative (``web=7:...,code=3:...`` is the same mixture).  Checking a setting
here reads no file, so it is also the up-front validation of a run's config.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from fractions import Fraction

from ..assets import DEFAULT_TRAIN_PATH, DEFAULT_VALID_PATH
from .shard_format import METADATA
from .shards import is_shard_folder

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SUFFIXES_TEXT = ".txt, .jsonl or .parquet"

# ``NAME=WEIGHT:GLOB``.  Name and weight may not hold a path separator, so a
# plain glob such as ``/data/year=2024/*.parquet`` is never read as a prefix.
_WEIGHTED_ENTRY = re.compile(r"([^=:/\\]*)=([^:/\\]*):(.*)", re.DOTALL)
_SOURCE_NAME = re.compile(r"[A-Za-z_][\w.-]*")


@dataclass
class DataSource:
    """One source of a ``dataset_path``: its text files and token-shard folders, in order."""

    name: str
    weight: Fraction  # normalised: the weights of all sources sum to 1
    files: list[str]

    @property
    def shard_folders(self) -> list[str]:
        return [f for f in self.files if os.path.isdir(f)]

    @property
    def text_files(self) -> list[str]:
        return [f for f in self.files if not os.path.isdir(f)]


def parse_dataset_sources(
    dataset_path: str | None, config_key: str, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES
) -> list[DataSource]:
    """Split a ``dataset_path`` into sources with weights and files (syntax: module docstring).

    Plain globs give one source called ``data`` of weight 1.  Every error is a
    single line that names ``config_key`` so the user knows which setting to fix.
    """
    if dataset_path is None or not str(dataset_path).strip():
        raise ValueError(
            f"{config_key} is not set: give comma-separated globs of {_SUFFIXES_TEXT} files or token-shard folders, "
            f"e.g. {_default_for(config_key)}, or weighted sources NAME=WEIGHT:GLOB,..."
        )
    groups: list[tuple[str | None, Fraction, list[str]]] = []  # (name, weight, globs)
    for entry in (e.strip() for e in str(dataset_path).split(",")):
        if not entry:
            continue
        match = _WEIGHTED_ENTRY.fullmatch(entry)
        if match is None:  # a bare glob continues the source before it
            if groups:
                groups[-1][2].append(entry)
            else:
                groups.append((None, Fraction(1), [entry]))
            continue
        name, weight, pattern = (g.strip() for g in match.groups())
        if groups and groups[0][0] is None:
            raise ValueError(
                f"{config_key}: '{groups[0][2][0]}' has no NAME=WEIGHT: prefix but '{entry}' "
                "has one; when weights are given, the first glob needs one too"
            )
        _check_name(name, entry, groups, config_key)
        if not pattern:
            raise ValueError(f"{config_key}: source '{name}' has no glob after '{name}={weight}:'")
        groups.append((name, _parse_weight(name, weight, config_key), [pattern]))
    if not groups:
        raise ValueError(f"{config_key}='{dataset_path}' contains no globs")
    total = sum(weight for _, weight, _ in groups)
    return [
        DataSource(name or "data", weight / total, _expand_globs(globs, config_key, suffixes))
        for name, weight, globs in groups
    ]


def _check_name(name: str, entry: str, groups: list, config_key: str) -> None:
    if not _SOURCE_NAME.fullmatch(name):
        raise ValueError(
            f"{config_key}: '{entry}' needs a source name (letters, digits, _ . -) before '='"
        )
    if any(name == other for other, _, _ in groups):
        raise ValueError(f"{config_key}: source name '{name}' is used twice")


def _parse_weight(name: str, weight: str, config_key: str) -> Fraction:
    # Exact fractions: "0.7" is 7/10, so the interleaving has no rounding drift.
    try:
        value = Fraction(weight)
    except (ValueError, ZeroDivisionError):
        value = Fraction(0)
    if value <= 0:
        raise ValueError(
            f"{config_key}: source '{name}' has weight '{weight}'; write NAME=WEIGHT:GLOB with "
            "WEIGHT a positive number, e.g. web=0.7:/data/web/*.jsonl"
        )
    return value


def _expand_globs(patterns: list[str], config_key: str, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES) -> list[str]:
    """Files and shard folders of a source's globs: globs in the given order, matches
    of one glob sorted (so the order does not depend on the file system), each once."""
    files: dict[str, None] = {}  # an ordered set
    for pattern in patterns:
        matches = sorted(
            _shard_folder_of(p) or p
            for p in glob.glob(os.path.expanduser(pattern), recursive=True)
            if os.path.isfile(p) or is_shard_folder(p)
        )
        if not matches:
            hint = " (a weighted source is written NAME=WEIGHT:GLOB)" if "=" in pattern else ""
            raise FileNotFoundError(f"{config_key}: glob '{pattern}' matched no files or token-shard folders{hint}")
        for path in matches:
            if os.path.isdir(path):
                files[path] = None
                continue
            if not path.endswith(suffixes):
                raise ValueError(
                    f"{config_key}: '{path}' (from glob '{pattern}') is not a {_SUFFIXES_TEXT if suffixes == SUPPORTED_SUFFIXES else ', '.join(suffixes)} file"
                )
            files[path] = None
    return list(files)


def _shard_folder_of(path: str) -> str | None:
    """The folder of a ``metadata.json`` that a glob named directly."""
    return (os.path.dirname(path) or ".") if os.path.basename(path) == METADATA else None


def resolve_dataset_files(
    dataset_path: str | None, config_key: str, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES
) -> list[str]:
    """All files of all sources of a ``dataset_path`` in order, each once.

    Checks the whole setting (weights included), so it is also the up-front
    validation of a run's config.
    """
    sources = parse_dataset_sources(dataset_path, config_key, suffixes)
    return list(dict.fromkeys(path for source in sources for path in source.files))


def _default_for(config_key: str) -> str:
    """The bundled corpus file matching a config key, for error messages."""
    return DEFAULT_VALID_PATH if config_key.startswith("validation") else DEFAULT_TRAIN_PATH
