"""Build ``.whl/``: the wheels a lent GPU machine lacks to import torchtitan 0.2.2 and this project.

    python benchmarks/build_gpu_wheels.py [--dest .whl] [--list] [--check-only]

The lent machine (one H200, Python 3.12, torch 2.11) reaches no network, so what it
lacks travels with the repository as wheels, and ``benchmarks/gpu_check.sh`` installs
them with ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl``. The
project itself goes on ``PYTHONPATH`` from the repository. ``--no-deps`` means nothing
checks the wheels' requirements there, so this script does it here: every
``Requires-Dist`` of every wheel (for Python 3.12 on Linux, no extras) must be met by
another pinned wheel or by a package the machine's image already holds (``GPU_IMAGE``;
a requirement on a package whose version there is not recorded is listed as unverified).
"""

from __future__ import annotations

import argparse
import email.parser
import os
import re
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the GPU machine lacks, one version each. datasets 5.2.0 is the release that
# accepts the image's huggingface_hub 1.33 (>=1.31,<3) and any fsspec up to the
# newest (2026.9.0); dill / multiprocess are the versions it allows.
PINS = {
    "torchtitan": "0.2.2",
    "torchdata": "0.11.0",
    "datasets": "5.2.0",
    "dill": "0.4.1",
    "multiprocess": "0.70.19",
    "tyro": "1.0.17",
    "typeguard": "4.6.1",
    "docstring-parser": "0.18.0",
    "tomli": "2.5.0",
}

# Packages of the GPU machine's image that the wheels require (version where a session
# read it there, None where only the name is recorded).
GPU_IMAGE = {
    "torch": "2.11.0", "triton": "3.6.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2", "transformers": "5.17.0", "safetensors": "0.8.0", "sentencepiece": "0.2.2",
    "fsspec": None, "pyarrow": None, "pandas": None, "filelock": None, "tqdm": None, "xxhash": None,
    "packaging": None, "pyyaml": None, "requests": None, "urllib3": None, "typing-extensions": None,
    "tensorboard": None, "einops": None, "pillow": None, "aiohttp": None, "httpx": None,
}

TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_BYTES = 40 * 2**20


def download_command(dest: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", dest]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + [f"{name}=={version}" for name, version in PINS.items()]


def wheel_name_version(filename: str) -> tuple[str, str]:
    name, version = os.path.basename(filename).split("-")[:2]
    return canonicalize_name(name), version


def wheels(dest: str) -> list[str]:
    return sorted(os.path.join(dest, f) for f in os.listdir(dest) if f.endswith(".whl")) if os.path.isdir(dest) else []


def remove_unpinned(dest: str) -> None:
    """Keep one version of each package: drop wheels of other versions or packages."""
    pins = {canonicalize_name(n): v for n, v in PINS.items()}
    for path in wheels(dest):
        name, version = wheel_name_version(path)
        if pins.get(name) != version:
            os.remove(path)


def requirements(path: str) -> list[Requirement]:
    """The wheel's unconditional requirements on the target (Python 3.12, Linux, no extras)."""
    with zipfile.ZipFile(path) as z:
        metadata = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        message = email.parser.Parser().parsestr(z.read(metadata).decode())
    reqs = [Requirement(line) for line in message.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET)]


def check(dest: str) -> list[str]:
    """Problems with the folder: a pin without its wheel, or a requirement nothing meets.
    Prints one line per requirement."""
    found = {wheel_name_version(p)[0]: p for p in wheels(dest)}
    pins = {canonicalize_name(n): v for n, v in PINS.items()}
    problems = [f"no wheel of {name}=={version}" for name, version in pins.items() if name not in found]
    image = {canonicalize_name(n): v for n, v in GPU_IMAGE.items()}
    for name, path in sorted(found.items()):
        for req in requirements(path):
            dep = canonicalize_name(req.name)
            if dep in pins:
                where, version = "wheel", pins[dep]
            elif dep in image:
                where, version = "image", image[dep]
            else:
                problems.append(f"{name} requires {req}: neither a wheel here nor in the GPU image")
                continue
            if version is None:
                verdict = "unverified (version on the machine not recorded)"
            elif req.specifier.contains(Version(version), prereleases=True):
                verdict = "ok"
            else:
                verdict = "CONFLICT"
                problems.append(f"{name} requires {req}, the {where} has {version}")
            print(f"  {name:<18} {str(req):<40} {where} {version or '?':<8} {verdict}")
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=os.path.join(REPO, ".whl"))
    p.add_argument("--list", action="store_true", help="print the pinned name==version lines and exit")
    p.add_argument("--check-only", action="store_true", help="check the folder's wheels without downloading")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(f"{name}=={version}" for name, version in PINS.items()))
        return
    if not a.check_only:
        os.makedirs(a.dest, exist_ok=True)
        remove_unpinned(a.dest)
        subprocess.run(download_command(a.dest), check=True)
    problems = check(a.dest)
    total = sum(os.path.getsize(p) for p in wheels(a.dest))
    print(f"{len(wheels(a.dest))} wheels in {a.dest}: {total / 2**20:.2f} MiB")
    if total > MAX_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB is over the {MAX_BYTES / 2**20:.0f} MiB carried with the repository")
    if problems:
        raise SystemExit("build_gpu_wheels: " + "; ".join(problems))


if __name__ == "__main__":
    main()
