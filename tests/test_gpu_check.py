"""The one-shot GPU check, on CPU and offline: the wheel folder's pins, the driver's
arguments, the JSON it writes, and how it reads a training log."""

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import build_gpu_wheels as wheels  # noqa: E402
import gpu_check  # noqa: E402


# ---- the wheel folder ----------------------------------------------------------------


def test_pins_name_each_package_once_with_one_exact_version():
    names = [canonicalize_name(n) for n in wheels.PINS]
    assert len(names) == len(set(names))
    assert wheels.PINS["torchtitan"] == "0.2.2"
    for needed in ("torchdata", "datasets", "tyro", "tomli", "dill", "multiprocess", "docstring-parser", "typeguard"):
        assert needed in wheels.PINS
    assert not set(names) & {canonicalize_name(n) for n in wheels.GPU_IMAGE}, "carry only what the machine lacks"


def test_list_mode_prints_the_pins():
    out = subprocess.run([sys.executable, "benchmarks/build_gpu_wheels.py", "--list"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"{n}=={v}" for n, v in wheels.PINS.items()]


def test_download_command_asks_for_cp312_manylinux_wheels_only():
    cmd = wheels.download_command(".whl")
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == list(wheels.PLATFORMS)
    assert cmd[-len(wheels.PINS):] == [f"{n}=={v}" for n, v in wheels.PINS.items()]


def fake_wheel(folder, name: str, version: str, requires: list[str]) -> None:
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def test_check_flags_conflicts_and_missing_requirements(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "PINS", {"alpha": "1.0", "beta": "2.0"})
    monkeypatch.setattr(wheels, "GPU_IMAGE", {"numpy": "2.5.2", "pandas": None})
    fake_wheel(tmp_path, "alpha", "1.0", ["beta<2", "numpy>=2", "pandas", "gamma", 'eval-type-backport; python_version < "3.10"',
                                          'pytest; extra == "dev"'])
    problems = wheels.check(str(tmp_path))
    assert problems == [
        "no wheel of beta==2.0",
        "alpha requires beta<2, the wheel has 2.0",
        "alpha requires gamma: neither a wheel here nor in the GPU image",
    ]


def test_check_accepts_a_consistent_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "PINS", {"alpha": "1.0", "beta": "2.0"})
    monkeypatch.setattr(wheels, "GPU_IMAGE", {"huggingface-hub": "1.33.0"})
    fake_wheel(tmp_path, "alpha", "1.0", ["beta>=2,<3", "huggingface-hub<3.0,>=1.31.0"])
    fake_wheel(tmp_path, "beta", "2.0", [])
    fake_wheel(tmp_path, "beta", "1.9", [])  # another version: removed
    wheels.remove_unpinned(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["alpha-1.0-py3-none-any.whl", "beta-2.0-py3-none-any.whl"]
    assert wheels.check(str(tmp_path)) == []


@pytest.mark.skipif(not wheels.wheels(os.path.join(REPO, ".whl")), reason="no .whl/ built here")
def test_the_built_folder_holds_the_pins_and_meets_their_requirements():
    folder = os.path.join(REPO, ".whl")
    assert sorted(wheels.wheel_name_version(p) for p in wheels.wheels(folder)) == sorted(
        (canonicalize_name(n), v) for n, v in wheels.PINS.items())
    assert wheels.check(folder) == []


# ---- the driver ----------------------------------------------------------------------


def test_parts_argument():
    assert gpu_check.parse_args(["--parts", "all"]).parts == gpu_check.PART_NAMES
    assert gpu_check.parse_args([]).parts == gpu_check.PART_NAMES
    assert gpu_check.parse_args(["--parts", "none"]).parts == []
    assert gpu_check.parse_args(["--parts", "env,planner"]).parts == ["env", "planner"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "env,nope"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--profile", "tpu"])


def test_every_profile_gives_every_part_a_time_limit_inside_the_budget():
    for profile in gpu_check.PROFILES.values():
        assert set(profile.limits_s) == set(gpu_check.PART_NAMES)
        assert max(profile.limits_s.values()) < profile.budget_s
    # One device call may run 10 minutes; the wheel install and the start-up take under one,
    # and a session's 15 minutes of device time must leave room for the machine's start.
    assert gpu_check.PROFILES["gpu"].budget_s <= 9 * 60


def test_dry_run_writes_the_skeleton(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path), "--work", str(tmp_path / "w")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"schema", "profile", "dry_run", "budget_s", "peak_flops_h200_bf16_dense", "started", "finished",
            "total_wall_s", "parts"} <= set(doc)
    assert doc["peak_flops_h200_bf16_dense"] == 989e12 and doc["profile"] == "gpu" and doc["dry_run"]
    assert list(doc["parts"]) == gpu_check.PART_NAMES
    for name, part in doc["parts"].items():
        assert set(part) == {"what", "status", "time_limit_s", "wall_s", "commands", "result", "figures", "error"}
        assert part["status"] == "dry-run" and part["commands"], name
    debug = doc["parts"]["debug_g2"]["commands"][0]
    for flag in ("--tying.group_size 2", "--training.mixed_precision_param bfloat16", "--compile.enable",
                 "--compile.backend inductor", "recipes/debug_cpu.toml"):
        assert flag in debug
    for line in out.stdout.splitlines()[2:9]:
        assert line.split()[1] == "dry-run"


def test_parts_none_writes_an_empty_document(tmp_path):
    gpu_check.main(["--parts", "none", "--out", str(tmp_path), "--work", str(tmp_path / "w")])
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["parts"] == {} and doc["total_wall_s"] is not None


LOG = """\
[titan] 2026-12-04 14:44:32,711 - root - INFO - \x1b[31mstep:  1  \x1b[32mloss:  8.13215  \x1b[38;2;180;60;0mgrad_norm:  0.6148  \x1b[38;2;54;234;195mmemory:  0.80GiB(3.41%)  \x1b[34mtps: 113  \x1b[36mtflops: 0.00  \x1b[35mmfu: 0.00%\x1b[39m
[titan] ... - INFO - moe: aux_loss 1.0012  z_loss 4.3386  max load_imbalance 1.426
[titan] ... - INFO - step: 10  loss:  6.50000  grad_norm:  0.7562  memory:  1.50GiB(3.91%)  tps: 1,200  tflops: 1.50  mfu: 0.15%
[titan] ... - INFO - step: 20  loss:  5.00000  grad_norm:  0.7000  memory:  1.20GiB(3.00%)  tps: 12,000  tflops: 12.00  mfu: 1.20%
[titan] ... - INFO - step: 30  loss:  4.50000  grad_norm:  0.7000  memory:  1.10GiB(3.00%)  tps: 14,000  tflops: 14.00  mfu: 1.40%
"""


def test_train_log_keeps_warm_intervals_for_throughput_and_the_peak_for_memory():
    r = gpu_check.train_log(LOG, log_freq=10)
    assert r["steps_logged"] == [1, 10, 20, 30] and r["throughput_steps"] == [20, 30]
    assert (r["loss_first"], r["loss_last"]) == (8.13215, 4.5)
    assert r["tokens_per_s"] == 13000 and r["mfu_pct_torchtitan"] == pytest.approx(1.3)
    assert r["peak_reserved_gib"] == 1.5
    with pytest.raises(ValueError):
        gpu_check.train_log("no steps here", log_freq=10)


def test_a_failing_or_slow_command_is_recorded_and_the_next_part_runs(tmp_path, monkeypatch):
    parts = [
        gpu_check.Part("fails", "exits 3", [[sys.executable, "-c", "print('boom'); raise SystemExit(3)"]],
                       lambda outputs: {}, lambda r: ""),
        gpu_check.Part("slow", "sleeps", [[sys.executable, "-c", "import time; print('{\"a\": 1}', flush=True); time.sleep(60)"]],
                       lambda outputs: gpu_check.last_json(outputs[0]), lambda r: f"a={r['a']}"),
        gpu_check.Part("fine", "prints", [[sys.executable, "-c", "print('{\"b\": 2}')"]],
                       lambda outputs: gpu_check.last_json(outputs[0]), lambda r: f"b={r['b']}"),
    ]
    monkeypatch.setattr(gpu_check, "all_parts", lambda profile, work: parts)
    monkeypatch.setattr(gpu_check, "PART_NAMES", ["fails", "slow", "fine"])
    smoke = gpu_check.PROFILES["smoke"]
    monkeypatch.setitem(gpu_check.PROFILES, "smoke", dataclasses.replace(
        smoke, limits_s={"fails": 10, "slow": 2, "fine": 10}, budget_s=60))
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 1)
    doc = gpu_check.check(gpu_check.parse_args(["--profile", "smoke", "--out", str(tmp_path), "--work", str(tmp_path / "w")]))
    fails, slow, fine = (doc["parts"][n] for n in ("fails", "slow", "fine"))
    assert fails["status"] == "failed" and "exited 3" in fails["error"] and "boom" in fails["error"]
    assert slow["status"] == "timeout" and slow["result"] == {"a": 1} and slow["wall_s"] < 10
    assert fine["status"] == "ok" and fine["figures"] == "b=2"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["fine"]["status"] == "ok"
    log = (tmp_path / "gpu_check.log").read_text()
    assert "boom" in log and "exit None" in log
    table = gpu_check.summary(doc)
    assert "command 1 exited 3" in table and "b=2" in table
