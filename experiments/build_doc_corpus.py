"""Build an English prose corpus from the documentation that Debian packages install,
for the longer runs of ``experiments/reproduce_tying.py`` (the bundled training split,
0.57M tokens, would be read three times by a run of 4x the default tokens).

    apt-get install perl-doc git-doc debian-reference-en debian-handbook gnu-standards \\
        developers-reference debian-policy
    python experiments/build_doc_corpus.py            # -> outputs/doc_corpus/{train,valid}/

Every file of a package that ``SOURCES`` selects (``dpkg -L``) is one document: the
plain prose of an HTML page (paragraphs, list items, definitions and headings; code
listings, tables, tables of contents and navigation are left out) or of a POD page
(ordinary paragraphs, headings and items; verbatim code blocks are left out, formatting
codes are reduced to their text). A document goes to the held-out split when
``crc32(its name) % VALID_EVERY == 0``, so the split is by document and stable.

Written under ``--out`` (ignored by git, like all of ``outputs/``):

* ``text/train.jsonl``, ``text/valid.jsonl``: one document a line, ``text`` and
  ``source`` (``package:path``);
* ``train/``, ``valid/``: their token shards (``tiedmoe-data tokenize``, the bundled
  tokenizer), what ``reproduce_tying.py --data-train / --data-valid`` take;
* ``sources.json``: per package its version, licence (from its copyright file),
  documents, characters and, in all, the tokens of each split.

Refused in one line: a package that is not installed (install it, or leave it out with
``--packages``), a package that yields no document.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import re
import shutil
import subprocess
import zlib
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALID_EVERY = 20  # about one document in 20 is held out
MIN_CHARS = 500  # shorter documents are indexes and stubs, not prose


@dataclass(frozen=True)
class DocSource:
    package: str
    files: str  # regex over the package's installed paths
    kind: str  # "html" or "pod"


SOURCES = (
    DocSource("perl-doc", r"/pod/[^/]+\.pod$", "pod"),
    DocSource("git-doc", r"^/usr/share/doc/git-doc/.+\.html$", "html"),
    DocSource("debian-reference-en", r"\.en\.html$", "html"),
    DocSource("debian-handbook", r"/html/en-US/[^/]+\.html$", "html"),
    DocSource("gnu-standards", r"\.html$", "html"),
    # Sphinx's generated index and search pages hold no prose.
    DocSource("developers-reference", r"^/usr/share/developers-reference/(?!genindex|search)[^/]+\.html$", "html"),
    DocSource("debian-policy", r"/policy\.html/(?!genindex|search)[^/]+\.html$", "html"),
)
# Not python3.11-doc: the stdlib's documentation is kept aside for independent checks
# (and the default corpus is already the stdlib's docstrings).


# ---- HTML -------------------------------------------------------------------------


class HtmlProse(html.parser.HTMLParser):
    """Paragraph texts of an HTML page, in page order."""

    BLOCKS = {"p", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "caption", "figcaption"}
    BLOCK_CLASSES = {"para"}  # DocBook via publican (debian-handbook): <div class="para">
    SKIPPED_TAGS = {"head", "script", "style", "pre", "table", "nav", "textarea"}
    # class / id words of code listings, navigation, tables of contents and page furniture
    SKIPPED_WORDS = {"toc", "contents", "shortcontents", "docnav", "navheader", "navfooter", "sphinxsidebar", "related", "footer", "header",
                     "headerlink", "listingblock", "literalblock", "literallayout", "programlisting", "screen", "synopsis",
                     "highlight", "banner", "footnotes"}
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # open elements: (tag, inside a skipped one, a block)
        self.words: list[str] = []
        self.paragraphs: list[str] = []

    def _skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def _in_block(self) -> bool:
        return any(block for _, _, block in self.stack)

    def _flush(self) -> None:
        text = " ".join("".join(self.words).split())
        if re.search(r"[A-Za-z]", text):
            self.paragraphs.append(text)
        self.words = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.VOID:
            if tag == "br":
                self.words.append(" ")
            return
        names = {word for key, value in attrs if key in ("class", "id") and value for word in value.split()}
        skipped = self._skipping() or tag in self.SKIPPED_TAGS or bool(names & self.SKIPPED_WORDS)
        block = tag in self.BLOCKS or bool(names & self.BLOCK_CLASSES)
        if block and not skipped:
            self._flush()
        self.stack.append((tag, skipped, block))

    def handle_endtag(self, tag: str) -> None:
        # Unclosed elements (<p> before the next <p>, <li>) close with their parent.
        if not any(open_tag == tag for open_tag, _, _ in self.stack):
            return
        while self.stack:
            open_tag, skipped, block = self.stack.pop()
            if block and not skipped:
                self._flush()
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        if not self._skipping() and self._in_block():
            self.words.append(data)


def html_prose(source: str) -> str:
    parser = HtmlProse()
    parser.feed(source)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.paragraphs)


# ---- POD ----------------------------------------------------------------------------

# A formatting code: X<...>, or X<< ... >> with as many brackets on both sides and
# whitespace inside them (perlpodspec).
_CODE_START = re.compile(r"([A-Z])(<(?:<+(?=\s))?)")
_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _entity(name: str) -> str:
    """E<name>: POD's own names, a number (0x hexadecimal, 0 octal, else decimal) or an HTML name."""
    if name in _ENTITIES:
        return _ENTITIES[name]
    for pattern, base in ((r"0x[0-9a-fA-F]+", 16), (r"0[0-7]*", 8), (r"[1-9][0-9]*", 10)):
        if re.fullmatch(pattern, name):
            return chr(int(name, base))
    return html.unescape(f"&{name};")


def _link_text(target: str) -> str:
    """What a reader sees of L<...>: its text, or the page / section it names."""
    if "|" in target:
        return target.split("|", 1)[0]
    if "://" in target:
        return target
    page, _, section = target.partition("/")
    section = section.strip('"')
    return f'"{section}" in {page}' if page and section else section or page


def pod_codes(text: str, start: int = 0, closer: str | None = None) -> tuple[str, int]:
    """``text`` from ``start`` with formatting codes reduced to their text, up to
    ``closer`` (the end of an enclosing code) or the end; and where it stopped."""
    out, i = [], start
    while i < len(text):
        if closer and text.startswith(closer, i):
            return "".join(out), i + len(closer)
        code = _CODE_START.match(text, i)
        if not code:
            out.append(text[i])
            i += 1
            continue
        letter, brackets = code.groups()
        if len(brackets) == 1:
            inner, i = pod_codes(text, code.end(), ">")
        else:
            end = re.compile(r"\s+" + ">" * len(brackets)).search(text, code.end())
            stop = end.start() if end else len(text)
            inner = pod_codes(text[code.end():stop].strip())[0]
            i = end.end() if end else len(text)
        if letter == "E":
            out.append(_entity(inner.strip()))
        elif letter == "L":
            out.append(_link_text(inner))
        elif letter not in "XZ":  # X<> is an index entry, Z<> nothing
            out.append(inner)
    return "".join(out), i


def pod_prose(source: str) -> str:
    """Headings, items and ordinary paragraphs of a POD page, one paragraph each."""
    paragraphs, in_pod, begun = [], True, 0  # begun: open =begin regions (formatter-specific)
    for block in re.split(r"\n[ \t]*\n", source.replace("\r\n", "\n")):
        block = block.strip("\n")
        command = re.match(r"=[a-zA-Z]\w*", block)
        if command:
            name, body = command.group(0), block[command.end():].strip()
            in_pod = name != "=cut"
            if name == "=begin":
                begun += 1
            elif name == "=end":
                begun = max(0, begun - 1)
            elif not begun and (name.startswith("=head") or name == "=item"):
                paragraphs.append(re.sub(r"^(\*|\d+\.?)\s*", "", body))  # without the bullet or number
        elif in_pod and not begun and block.strip() and block[0] not in " \t":  # not code, not verbatim
            paragraphs.append(block)
    texts = (" ".join(pod_codes(p)[0].split()) for p in paragraphs)
    return "\n\n".join(t for t in texts if re.search(r"[A-Za-z]", t))


# ---- packages -------------------------------------------------------------------------


def dpkg(*args: str) -> str:
    done = subprocess.run(["dpkg-query", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"build_doc_corpus: {args[-1]} is not installed: apt-get install {args[-1]}, "
                         "or leave it out with --packages")
    return done.stdout


def licence(package: str) -> str:
    """The licence of the package's files at large: the first ``License:`` of its
    machine-readable copyright file (the ``Files: *`` paragraph's), else where to read it."""
    path = f"/usr/share/doc/{package}/copyright"
    if not os.path.isfile(path):
        return "unknown: no copyright file"
    with open(path, encoding="utf-8", errors="replace") as f:
        first = re.search(r"^License:\s*(.+)$", f.read(), flags=re.M)
    return first.group(1).strip() if first else f"see {path}"


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # older POD pages


def documents(source: DocSource) -> list[tuple[str, str]]:
    """(name, prose) of each selected file of the package, in path order."""
    pattern = re.compile(source.files)
    paths = sorted(p for p in dpkg("-L", source.package).splitlines() if pattern.search(p) and os.path.isfile(p))
    extract = html_prose if source.kind == "html" else pod_prose
    docs = []
    for path in paths:
        text = extract(read_text(path))
        if len(text) >= MIN_CHARS:
            docs.append((f"{source.package}:{path}", text))
    if not docs:
        raise SystemExit(f"build_doc_corpus: {source.package} gave no document of {MIN_CHARS}+ characters "
                         f"from files matching {source.files!r}")
    return docs


# ---- main -----------------------------------------------------------------------------


def build(out: str, packages: list[str], workers: int | None) -> dict:
    from tiedmoe_titan.data.tokenize import tokenize
    from tiedmoe_titan.tokenizer import DEFAULT_TOKENIZER_PATH

    chosen = [s for s in SOURCES if s.package in packages]
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    report = {"packages": {}, "valid_every": VALID_EVERY, "min_chars": MIN_CHARS, "tokenizer": DEFAULT_TOKENIZER_PATH}
    for source in chosen:
        counts = {"version": dpkg("-W", "-f=${Version}", source.package), "licence": licence(source.package),
                  "files": source.files, "documents": {"train": 0, "valid": 0}, "chars": {"train": 0, "valid": 0}}
        for name, text in documents(source):
            split = "valid" if zlib.crc32(name.encode()) % VALID_EVERY == 0 else "train"
            splits[split].append(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
            counts["documents"][split] += 1
            counts["chars"][split] += len(text)
        report["packages"][source.package] = counts
        print(f"{source.package} {counts['version']}: {sum(counts['documents'].values())} documents, "
              f"{sum(counts['chars'].values()) / 1e6:.2f}M characters", flush=True)
    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    report["tokens"] = {}
    for split, lines in splits.items():
        text_path = os.path.join(out, "text", f"{split}.jsonl")
        with open(text_path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        shards = os.path.join(out, split)
        shutil.rmtree(shards, ignore_errors=True)  # a rebuilt text is another tokenization
        report["tokens"][split] = tokenize([text_path], DEFAULT_TOKENIZER_PATH, shards, workers)["tokens"]
    with open(os.path.join(out, "sources.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{out}: train {report['tokens']['train']:,} tokens, valid {report['tokens']['valid']:,} tokens "
          f"(shards in train/ and valid/, text in text/, sources.json)")
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "outputs", "doc_corpus"), help="output folder (default: %(default)s)")
    p.add_argument("--packages", default=",".join(s.package for s in SOURCES),
                   help="comma-separated, of: %(default)s (default: all)")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: every core)")
    a = p.parse_args(argv)
    packages = a.packages.split(",")
    unknown = [name for name in packages if name not in {s.package for s in SOURCES}]
    if unknown:
        p.error(f"--packages: unknown {unknown[0]!r}; choose from {', '.join(s.package for s in SOURCES)}")
    build(os.path.abspath(a.out), packages, a.workers)


if __name__ == "__main__":
    main()
