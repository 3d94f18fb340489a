"""Hugging Face Hub ids as model specs, resolved through the standard Hugging Face cache.

A spec ``org/name`` or ``name``, with an optional ``@revision`` (a branch, a tag or a
commit hash: ``bert-base-uncased@main``, ``sentence-transformers/all-MiniLM-L6-v2@c9745ed``),
resolves to the snapshot folder ``<cache>/models--org--name/snapshots/<commit>`` that
``huggingface_hub.snapshot_download`` manages. The cache is the one every Hugging Face
library uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``),
so a cluster with a shared cache works, and ``HF_ENDPOINT`` (a mirror) is honoured by
``huggingface_hub`` itself. With ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) only
the cache is read; a missing id is a one-line error that says how to fill the cache.

The environment is read at call time (huggingface_hub reads it once, at import), so a
process that sets ``HF_HOME`` after importing transformers still gets what it asked for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from distill_common.errors import DistillUserError

# Other frameworks' weights and export formats: never needed to load a PyTorch encoder.
_NOT_NEEDED = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel",
               "onnx/*", "openvino/*", "coreml/*", "tf_model*", "flax_model*", "rust_model*"]
_TORCH_PICKLES = ["*.bin", "*.pt", "*.pth"]
_SNAPSHOT = re.compile(r"^models--(?P<org_name>.+)$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class HubModelError(DistillUserError, RuntimeError):
    """A Hub id that cannot be resolved (not in the cache offline, or not on the Hub)."""


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    """``org/name`` or ``name``."""
    revision: Optional[str] = None
    """A branch, tag or commit hash; None = ``main``."""

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_spec(spec: str) -> Optional[HubSpec]:
    """``org/name[@rev]`` or ``name[@rev]`` -> HubSpec; None when ``spec`` cannot be a Hub
    id (an absolute or explicitly relative path, more than one ``/``, odd characters)."""
    spec = spec.strip()
    if not spec or spec.startswith(("/", ".", "~")) or "\\" in spec:
        return None
    repo_id, _, revision = spec.partition("@")
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(_NAME.match(p) for p in parts):
        return None
    if "--" in repo_id or ".." in repo_id or repo_id.endswith(".git") or len(repo_id) > 96:
        return None
    if "@" in spec and not revision.strip():
        return None
    return HubSpec(repo_id, revision.strip() or None)


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub uses: ``HF_HUB_CACHE`` (or the older
    ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a true value (as huggingface_hub)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_ignore_patterns(files: Iterable[str]) -> list[str]:
    """What a download leaves out: other frameworks' formats, and pickled PyTorch weights
    when the repository also has safetensors (we never load a pickle we could avoid)."""
    files = list(files)
    safetensors = any(f.endswith(".safetensors") for f in files)
    return _NOT_NEEDED + (_TORCH_PICKLES if safetensors else [])


def resolve_hub_model(spec: HubSpec) -> Path:
    """The snapshot folder of ``spec`` in the Hub cache: read from the cache when offline,
    else downloaded (or refreshed) through huggingface_hub, which falls back to the
    cache when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        if hub_offline():
            folder = snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=cache,
                                       local_files_only=True)
        else:
            folder = snapshot_download(
                spec.repo_id, revision=spec.revision, cache_dir=cache,
                ignore_patterns=download_ignore_patterns(_listing(spec, cache)))
    except (LocalEntryNotFoundError, FileNotFoundError) as err:
        raise HubModelError(_missing_message(spec, cache)) from err
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as err:
        raise HubModelError(f"Hugging Face Hub id {str(spec)!r}: {_first_line(err)} (cache "
                            f"{cache}); check the id and revision, HF_ENDPOINT and HF_TOKEN, "
                            f"or set HF_HUB_OFFLINE=1 to use the cache only") from err
    return Path(folder)


def _listing(spec: HubSpec, cache: Path) -> list[str]:
    """The revision's files on the Hub; [] when they cannot be listed (offline, no such
    repository): the download that follows then falls back to the cache or says why."""
    from huggingface_hub import snapshot_download

    try:
        return [f.filename for f in snapshot_download(spec.repo_id, revision=spec.revision,
                                                      cache_dir=cache, dry_run=True)]
    except (OSError, ValueError):  # DryRunError and HfHubHTTPError are OSErrors
        return []


def _missing_message(spec: HubSpec, cache: Path) -> str:
    where = "offline (HF_HUB_OFFLINE=1)" if hub_offline() else "and the Hub cannot be reached"
    rev = f" --revision {spec.revision}" if spec.revision else ""
    return (f"Hugging Face Hub id {str(spec)!r} is not in the cache {cache} {where}; run "
            f"`hf download {spec.repo_id}{rev}` (huggingface_hub's CLI; `huggingface-cli "
            f"download` in older versions) on a machine with network into the same cache, "
            f"or point HF_HOME / HF_HUB_CACHE at a cache that holds it")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def hub_id_of_folder(folder: Path) -> Optional[HubSpec]:
    """``.../models--org--name/snapshots/<commit>`` -> HubSpec("org/name", "<commit>"):
    the Hub id of a folder inside a Hugging Face cache, None for any other folder."""
    folder = Path(folder)
    if folder.parent.name != "snapshots":
        return None
    match = _SNAPSHOT.match(folder.parent.parent.name)
    if not match:
        return None
    return HubSpec(match["org_name"].replace("--", "/"), folder.name)
