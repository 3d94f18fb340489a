"""The installed package works without the source tree: a wheel built from the sources,
installed (not editable) into a fresh virtual environment, finds its shipped recipes,
task recipes and cluster profiles from inside itself, run from a folder far from the
repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("configs", "cluster")


def _copy_sources(dest: Path) -> Path:
    """What the build reads: pyproject.toml, README.md, the packages and the shipped
    folders (a copy: the build writes build/ and *.egg-info into its source folder)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for entry in REPO.iterdir():
        if entry.name in SHIPPED or (entry / "__init__.py").is_file():
            shutil.copytree(entry, dest / entry.name, ignore=ignore)
    return dest


def _run(argv: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the wheel installed: its own site-packages first, then
    (through a .pth file) this interpreter's, so the dependencies are not reinstalled.
    A venv made from a venv gets the base interpreter's packages with
    --system-site-packages, not this one's: hence the .pth."""
    root = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(root / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--disable-pip-version-check", "-w", root / "dist", src], cwd=root)
    (wheel,) = (root / "dist").glob("distill_encoders-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "test_venv_packages.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    # --ignore-installed: the test venv's own (editable) distill-encoders stays untouched
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
          "--disable-pip-version-check", wheel], cwd=root)
    return venv


def test_the_wheel_carries_every_shipped_file(installed):
    (wheel,) = (installed.parent / "dist").glob("distill_encoders-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in SHIPPED:
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(REPO).as_posix()
                assert f"distill_resources/{rel}" in names, f"{rel} is not in the wheel"


@pytest.mark.slow
def test_installed_package_runs_from_anywhere(installed, tmp_path, tiny_teacher_nohead_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python, distill = installed / "bin" / "python", installed / "bin" / "distill"
    where = _run([python, "-c", "import distill_common, distill_resources; "
                                "print(distill_common.__file__)"], cwd=elsewhere).stdout
    assert where.startswith(str(installed)), where  # the installed copy, not the sources

    assert _run([distill, "--version"], cwd=elsewhere).stdout.startswith("distill 0.")
    shown = _run([distill, "config", "show", "demo"], cwd=elsewhere).stdout
    assert "name: demo" in shown and "qkv_relation_kl:" in shown
    # The demo's 3 x 224 student cut from teacher layers 1-5, resized to the 4 x 64 teacher
    plan = _run([distill, "launch", "demo", f"teacher.path={tiny_teacher_nohead_dir}",
                 "student.hidden_size=32", "student.intermediate_size=64",
                 "student.prune_depth=4", "objective.qkv_relation_kl.teacher_layer=4",
                 "objective.hidden_cosine.teacher_layer=4",
                 "--cluster", "local/2proc", "--stage", "pretrain", "--dry-run"],
                cwd=elsewhere).stdout
    packaged = f"{installed}/lib/python{sys.version_info.major}.{sys.version_info.minor}" \
               f"/site-packages/distill_resources"
    assert f"recipe {packaged}/configs/demo.yaml" in plan
    assert f"profile {packaged}/cluster/local/2proc.yaml" in plan
    assert "--nproc_per_node" in plan and "pretrain" in plan
    tasks = _run([distill, "tasks", "list"], cwd=elsewhere).stdout
    assert "bbc_news" in tasks and "wiki_topic" in tasks
