"""Hugging Face Hub ids as teacher and fine-tuning models, resolved offline from a cache
with the Hub's own layout (models--org--name/{blobs,snapshots/<commit>,refs/<ref>}) built
here from tiny models saved in code, with HF_HOME pointing at it and HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest

REPO = Path(__file__).resolve().parent.parent
COMMIT = "3" * 40
TAGGED = "7" * 40


def populate_hub_cache(hub_cache: Path, repo_id: str, folder: Path, commit: str = COMMIT,
                       refs: tuple[str, ...] = ("main",), repo_type: str = "model") -> Path:
    """Put ``folder``'s files into ``hub_cache`` the way huggingface_hub stores a download
    of a model (or dataset) repository: content-addressed blobs, a snapshot of relative
    symlinks, refs naming the commit. Returns the snapshot folder."""
    repo = hub_cache / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME, offline; HF_HUB_CACHE unset so that HF_HOME/hub is used."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def cached_teacher(hf_home, tokenizer_dir, tmp_path) -> Path:
    """tiny-org/tiny-teacher (BertForMaskedLM 4 x 64) at COMMIT on main, and a second
    commit tagged v2."""
    src = conftest._save_tiny_bert(tmp_path / "src", tokenizer_dir, with_head=True)
    populate_hub_cache(hf_home / "hub", "tiny-org/tiny-teacher", src, TAGGED, refs=("v2",))
    return populate_hub_cache(hf_home / "hub", "tiny-org/tiny-teacher", src)


@pytest.mark.parametrize("spec, want", [
    ("bert-base-uncased", ("bert-base-uncased", None)),
    ("sentence-transformers/all-MiniLM-L6-v2", ("sentence-transformers/all-MiniLM-L6-v2", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@" + COMMIT, ("org/name", COMMIT)),
    ("/abs/folder", None), ("./student", None), ("~/model", None), ("runs/demo/student", None),
    ("org/na--me", None), ("org/name@", None), ("org/name.git", None), ("", None),
])
def test_parse_hub_spec(spec, want):
    from distill_common.hub import parse_hub_spec

    got = parse_hub_spec(spec)
    assert (got and (got.repo_id, got.revision)) == want or (got is None and want is None)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    from distill_common.hub import hub_cache_dir

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "shared"))
    assert hub_cache_dir() == tmp_path / "shared"


def test_downloads_leave_out_pickles_only_beside_safetensors():
    from distill_common.hub import download_ignore_patterns

    assert "*.bin" in download_ignore_patterns(["config.json", "model.safetensors",
                                                "pytorch_model.bin"])
    assert "*.bin" not in download_ignore_patterns(["config.json", "pytorch_model.bin"])
    assert "onnx/*" in download_ignore_patterns([])


def test_hub_id_resolves_from_the_cache_offline(cached_teacher, hf_home):
    from distill_common.assets import resolve_model_dir
    from distill_common.hub import hub_id_of_folder

    assert resolve_model_dir("tiny-org/tiny-teacher") == cached_teacher
    assert resolve_model_dir(f"tiny-org/tiny-teacher@{COMMIT}") == cached_teacher
    tagged = resolve_model_dir("tiny-org/tiny-teacher@v2")
    assert tagged.name == TAGGED and (tagged / "config.json").is_file()
    found = hub_id_of_folder(cached_teacher)
    assert (found.repo_id, found.revision) == ("tiny-org/tiny-teacher", COMMIT)
    assert hub_id_of_folder(hf_home) is None
    # A local folder still wins, and asset names are still assets.
    assert resolve_model_dir(str(cached_teacher)) == cached_teacher


def test_missing_hub_id_is_one_line_naming_the_id_cache_and_fix(hf_home):
    from distill_common.assets import AssetError, resolve_model_dir

    with pytest.raises(AssetError) as err:
        resolve_model_dir("tiny-org/not-there@v3")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'tiny-org/not-there@v3'" in msg and str(hf_home / "hub") in msg
    assert "hf download tiny-org/not-there --revision v3" in msg and "HF_HOME" in msg
    with pytest.raises(AssetError, match="neither a folder, a model asset"):
        resolve_model_dir("runs/no-such-run-here/student")


def test_teacher_loads_from_a_hub_id(cached_teacher):
    from distill_pretrain.config import TeacherConfig
    from distill_pretrain.teacher import load_teacher

    teacher = load_teacher(TeacherConfig(path="tiny-org/tiny-teacher"))
    assert teacher.path == cached_teacher and teacher.has_mlm_head
    assert teacher.num_layers == 4 and teacher.hidden_size == 64
    assert teacher.tokenizer.vocab_size == len(conftest.tiny_vocab())


def test_teacher_error_names_the_recipe_key(hf_home):
    from distill_pretrain.config import RecipeValidationError, TeacherConfig
    from distill_pretrain.teacher import load_teacher

    with pytest.raises(RecipeValidationError, match=r"^teacher\.path: .*hf download"):
        load_teacher(TeacherConfig(path="tiny-org/absent"))


def test_finetune_takes_a_hub_id(hf_home, tmp_path):
    import pandas as pd

    from finetune import run_task
    from test_finetune_train import classification_rows, finetune_cfg, save_tiny_bert, write_task

    snapshot = populate_hub_cache(hf_home / "hub", "tiny-org/tiny-encoder",
                                  save_tiny_bert(tmp_path / "encoder"))
    pd.DataFrame(classification_rows(120)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", "name: topics\ntype: classification\n"
                      "source: {path: topics.csv}\ncolumns: {text: sentence, label: topic}\n")
    res = run_task("tiny-org/tiny-encoder", task, tmp_path / "out",
                   finetune_cfg("epochs=1", "save_model=none"))
    assert res["model_dir"] == str(snapshot.resolve()) and 0 <= res["score"] <= 1


def test_a_fresh_process_reads_hf_home(cached_teacher, hf_home, tmp_path):
    """`distill config validate` in a new process (the environment read at start, as on
    a cluster node with a shared cache)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: hub\nteacher: {path: tiny-org/tiny-teacher}\n"
                      "student: {num_layers: 2}\nobjective: {hidden_cosine: {weight: 1.0}}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "distill_cli", "config", "validate",
                           str(recipe)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env["HF_HOME"] = str(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-m", "distill_cli", "config", "validate",
                           str(recipe)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "tiny-org/tiny-teacher" in proc.stderr
    assert str(tmp_path / "empty" / "hub") in proc.stderr
