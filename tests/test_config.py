"""Recipe parsing: YAML + dotted overrides into typed dataclasses, and every error names
the file, the key and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from launcher.recipe import Recipe, configs_dir, load_recipe, resolve_recipe_path
from distill_common.config import ConfigError, check, check_choice, load_config, to_yaml


@dataclass
class Inner:
    lr: float = 1e-3
    """learning rate"""
    kind: str = "linear"

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check_choice(self.kind, "kind", ["linear", "cosine"])


@dataclass
class Outer:
    steps: int = 10
    name: Optional[str] = None
    inner: Inner = field(default_factory=Inner)
    items: List[Inner] = field(default_factory=list)

    def __post_init__(self):
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides_merge(tmp_path):
    p = write(tmp_path, "steps: 5\ninner:\n  kind: cosine\n")
    cfg = load_config(Outer, p, ["inner.lr=0.5", "name=run1"])
    assert isinstance(cfg.inner, Inner)
    assert (cfg.steps, cfg.name, cfg.inner.lr, cfg.inner.kind) == (5, "run1", 0.5, "cosine")


def test_list_of_dataclasses_is_built_and_validated(tmp_path):
    p = write(tmp_path, "items:\n  - {lr: 0.1}\n  - {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"items\[1\]\.lr: must be > 0"):
        load_config(Outer, p)


def test_unknown_key_names_the_dotted_key(tmp_path):
    p = write(tmp_path, "inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Outer, p)
    assert str(p) in str(e.value) and "inner.lrr" in str(e.value)
    assert "unknown key" in str(e.value)


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"steps.*abc.*Integer"):
        load_config(Outer, None, ["steps=abc"])


def test_out_of_range_names_nested_key_and_file(tmp_path):
    p = write(tmp_path, "inner:\n  lr: 0\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: inner.lr: must be > 0, got 0"):
        load_config(Outer, p)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"inner.kind: must be one of \['linear', 'cosine'\]"):
        load_config(Outer, None, ["inner.kind=step"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(Outer, None, ["steps"])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "steps: [1,\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"))


def test_recipe_fills_stage_paths_from_output_dir(tmp_path):
    r = load_config(Recipe, None, ["name=abc", f"output_dir={tmp_path}/run"])
    assert r.prep.output_dir == f"{tmp_path}/run/shards"
    assert r.train.data_dir == r.prep.output_dir
    assert r.train.output_dir.endswith("/pretrain")
    assert r.train.export_dir.endswith("/student")
    assert r.finetune.output_dir.endswith("/finetune")
    assert r.report.output_dir.endswith("/report")
    # interpolation of the run name into the default output_dir
    assert load_config(Recipe, None, ["name=xyz"]).output_dir == "runs/xyz"


def test_explicit_stage_paths_are_kept():
    r = load_config(Recipe, None, ["prep.output_dir=/data/shards"])
    assert r.train.data_dir == "/data/shards"


def test_to_yaml_round_trips(tmp_path):
    r = load_config(Recipe, None, ["name=rt", "seed=3"])
    p = write(tmp_path, to_yaml(r))
    assert load_config(Recipe, p) == r


def test_recipe_names_resolve_to_configs_folder():
    assert resolve_recipe_path("debug") == configs_dir() / "debug.yaml"
    assert resolve_recipe_path("x/y.yaml") == Path("x/y.yaml")


RECIPES = sorted(p for p in configs_dir().glob("*.yaml"))


def test_configs_folder_has_recipes():
    names = {p.stem for p in RECIPES}
    assert {"debug", "demo"} <= names, names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(str(path))
    assert isinstance(recipe, Recipe)
    assert recipe.name
    header = path.read_text().lstrip().splitlines()[0]
    assert header.startswith("#"), f"{path.name} must start with a comment saying what it is"
