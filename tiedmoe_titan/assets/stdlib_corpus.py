"""Building the bundled corpus from the docstrings of Python's standard library.

``tiedmoe-data build-corpus`` runs it; it lives next to the files it writes.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator

# Tests and vendored third-party code are not standard-library prose.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_modules(root: str) -> Iterator[str]:
    """Relative paths of the stdlib's .py files, in a sorted, stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, name), root)


def module_docstrings(source: str) -> str:
    """All docstrings of a module in source order, separated by blank lines."""
    parts: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                parts.append(doc)
        for child in ast.iter_child_nodes(node):  # field order == source order
            visit(child)

    visit(ast.parse(source))
    return "\n\n".join(parts)


def build_stdlib_corpus(
    output_dir: str,
    valid_every: int = 20,
    min_chars: int = 200,
    max_bytes: int = 2_000_000,
) -> dict[str, int]:
    """Write ``train.jsonl``/``valid.jsonl``: one document per stdlib module.

    A module goes to validation when ``crc32(path) % valid_every == 0``, so the
    split is stable when modules are added or removed.  Documents that would push
    the total past ``max_bytes`` are dropped (in sorted order) to bound the
    asset size.
    Returns document and byte counts.
    """
    root = sysconfig.get_paths()["stdlib"]
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    size = {"train": 0, "valid": 0}
    scanned = 0
    for rel in _stdlib_modules(root):
        scanned += 1
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = module_docstrings(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError) as e:
            print(f"  skip {rel}: {type(e).__name__}", file=sys.stderr)
            continue
        if len(text) < min_chars:
            continue
        line = json.dumps({"text": text, "source": rel}, ensure_ascii=False) + "\n"
        split = "valid" if zlib.crc32(rel.encode()) % valid_every == 0 else "train"
        n = len(line.encode("utf-8"))
        if size["train"] + size["valid"] + n > max_bytes:
            continue
        splits[split].append(line)
        size[split] += n
    os.makedirs(output_dir, exist_ok=True)
    for split, lines in splits.items():
        path = os.path.join(output_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        print(f"wrote {path}: {len(lines)} documents, {size[split]} bytes")
    print(f"scanned {scanned} modules under {root} (Python {sys.version.split()[0]})")
    return {"train_docs": len(splits["train"]), "valid_docs": len(splits["valid"]),
            "train_bytes": size["train"], "valid_bytes": size["valid"]}
