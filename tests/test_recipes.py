"""Every recipe dry-runs against a weightless checkpoint with the real model's dimensions."""

from __future__ import annotations

import json

import pytest

from moesurgery.cli import main
from moesurgery.recipes import RECIPE_DIR, load_recipe, recipe_names, tomllib
from moesurgery.errors import UsageError
from moesurgery.skeleton import write_skeleton

RECIPES = recipe_names()


def test_recipes_exist():
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_dry_runs_on_real_dimensions(name, tmp_path, capsys):
    path = RECIPE_DIR / f"{name}.toml"
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# moesurgery ") and f"--recipe {name}" in first, "a recipe starts with the command it runs"
    recipe = tomllib.loads(text)
    src = write_skeleton(recipe["model_config"], tmp_path / "src")
    donors = []  # a donor recipe: its donors as skeletons of the same model (their Hub ids are not fetched here)
    for i, _ in enumerate(recipe.get("donors", [])):
        donors += ["--donor", str(write_skeleton(recipe["model_config"], tmp_path / f"donor{i}"))]
    rc = main([recipe["command"], str(src), str(tmp_path / "out"), "--recipe", name, "--dry-run", "--json", *donors])
    out = capsys.readouterr().out
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out)
    assert not (tmp_path / "out").exists()
    if recipe.get("donors"):
        from moesurgery.recipes import load_donors

        sources, prompts = load_donors(name)
        assert len(sources) == len(prompts) == len(recipe["donors"]) and report["experts"] == len(sources) * recipe["options"]["granularity"]
    elif recipe["command"] == "upcycle":
        assert report["expected"] == "exact"
    cfg = recipe["model_config"].get("text_config", recipe["model_config"])  # a wrapper's language model
    if "dim" in cfg:  # Mistral's params.json
        from moesurgery.native import hf_config

        cfg = hf_config(cfg)
        assert (tmp_path / "src" / "params.json").is_file()
    dense = recipe["options"].get("first_k_dense", 0) or cfg.get("first_k_dense_replace", 0)
    assert report["moe_layers"] == cfg["num_hidden_layers"] - dense
    if "quantization" in recipe["model_config"]:  # Mistral's per-tensor FP8: read dequantized, said so
        assert any("FP8" in n for n in report["notes"]), report["notes"]
    if "quantization_config" in cfg:  # a quantized source whose surgery stays on the block / group grid
        assert any("written as" in n and "like the source" in n for n in report["notes"]), report["notes"]
    if "text_config" in recipe["model_config"]:
        assert any("wrapper" in n for n in report["notes"]), report["notes"]
    options = recipe["options"]
    if recipe["command"] == "prune-experts":
        assert report["experts"] == options["keep"] and report["expected"] == "lossy"
    elif recipe.get("donors"):
        assert report["top_k"] == options["top_k"] and report["shared_width"] == cfg["intermediate_size"] // (options["granularity"] + options["shared"]) * options["shared"]
    elif "experts" in options:
        assert report["experts"] == options["experts"] and report["top_k"] == options["top_k"]
    else:  # finer experts: E*m experts, k*m top-k
        m = options["granularity"]
        experts = next(cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts") if k in cfg)
        assert report["experts"] == experts * m and report["expected"] == "exact"
        assert report["top_k"] == cfg["num_experts_per_tok"] * m


def test_flags_override_recipe(tmp_path, capsys):
    recipe = tomllib.loads((RECIPE_DIR / "mixtral-8x7b-deepseek.toml").read_text())
    src = write_skeleton(recipe["model_config"], tmp_path / "src")
    assert main(["upcycle", str(src), str(tmp_path / "o"), "--recipe", "mixtral-8x7b-deepseek", "--granularity", "4", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts"] == 32


def test_recipe_errors(tmp_path):
    with pytest.raises(UsageError, match="no recipe"):
        load_recipe("nope", "upcycle")
    with pytest.raises(UsageError, match="`upcycle` recipe"):
        load_recipe("mixtral-8x7b-deepseek", "split-experts")
    bad = tmp_path / "bad.toml"
    bad.write_text("command = 'upcycle'\n[options]\nbogus = 1\n")
    assert main(["upcycle", "tiny:llama", str(tmp_path / "o"), "--recipe", str(bad), "--dry-run"]) == 2


def test_readme_lists_every_recipe():
    readme = (RECIPE_DIR.parent / "README.md").read_text()
    missing = [p.stem for p in RECIPE_DIR.glob("*.toml") if f"`{p.stem}`" not in readme]
    assert missing == [], f"README's recipe table lacks {missing}"
