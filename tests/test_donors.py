"""upcycle --donor: an MoE from fine-tuned models of one base, DeepSeek-style (fine-grained virtual groups
per donor, shared experts from the base); exact when every donor equals the base; mismatches refused
before work; per-donor diagnosis; streamed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesurgery.cli import main
from moesurgery.errors import BadInputError
from moesurgery.operations import upcycle_donors
from tests.fixtures import reference_logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def finetuned(base, path, seed, scale=0.05):
    """A 'fine-tune' of base: its FFN weights nudged."""
    shutil.copytree(base, path)
    t = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for k in t:
        if ".mlp." in k:
            t[k] = t[k] + scale * torch.randn(t[k].shape, generator=g) * t[k].std()
    save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture
def prompts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(f"w{i}" for i in range(4, 40)))
    b.write_text(" ".join(f"w{i}" for i in range(60, 120)))
    return [a.read_text(), b.read_text()]


@pytest.mark.parametrize("to", ["glm4_moe", "qwen2_moe", "mixtral"])
def test_identical_donors_compute_the_base_exactly(checkpoint, input_ids, tmp_path, prompts, to):
    base = checkpoint("llama")  # FFN 128 = (G 2 + S 2) x 32
    shared = 0 if to == "mixtral" else 2
    report = upcycle_donors(base, tmp_path / "o", donors=[base, base], prompts=prompts, granularity=2, top_k=2, shared=shared, to=to)
    assert report["verdict"] == "exact" and report["experts"] == 4 and report["top_k"] == 2
    assert rel_err(reference_logits(tmp_path / "o", input_ids), reference_logits(base, input_ids)) < 1e-5
    assert all(d["block_rel_err_mean"] < 1e-5 for d in report["donors"])


def test_distinct_donors_are_diagnosed_per_donor(checkpoint, tmp_path, prompts):
    base = checkpoint("llama")
    a, b = finetuned(base, tmp_path / "a", 1), finetuned(base, tmp_path / "b", 2)
    report = upcycle_donors(base, tmp_path / "o", donors=[a, b], prompts=prompts, granularity=2, top_k=2, shared=2)
    assert report["verdict"] == "lossy"
    for d in report["donors"]:
        assert 0 < d["block_rel_err_mean"] < 1 and "perplexity" in d
    sep = report["separability"]
    assert -1 <= sep["max_mean_cosine"] <= 1 and len(sep["own_group_first"]) == 2
    # the shared experts come from the donors' mean with --shared-from mean
    upcycle_donors(base, tmp_path / "m", donors=[a, b], prompts=prompts, granularity=2, top_k=2, shared=2, shared_from="mean")


def test_router_modes(checkpoint, tmp_path, prompts):
    base = checkpoint("llama")
    r = upcycle_donors(base, tmp_path / "c", donors=[base, base], prompts=prompts, granularity=2, top_k=2, router="calibration", diagnose=False)
    assert r["router_init"] == "calibration" and r["verdict"] == "exact"
    r = upcycle_donors(base, tmp_path / "r", donors=[base, base], granularity=2, top_k=2)
    assert r["router_init"] == "random" and r["verdict"] == "exact"


def test_mismatched_donors_refused_before_work(checkpoint, tmp_path, prompts):
    base = checkpoint("llama")
    other = checkpoint("llama", intermediate_size=96)
    with pytest.raises(BadInputError, match="mlp.gate_proj.weight has shape"):
        upcycle_donors(base, tmp_path / "o", donors=[base, other], prompts=prompts, granularity=2, top_k=2)
    with pytest.raises(BadInputError, match="is an MoE"):
        upcycle_donors(base, tmp_path / "o", donors=[checkpoint("mixtral")], granularity=2, top_k=2)
    assert not (tmp_path / "o").exists()


def test_cli_and_recipe_with_donors(capsys, checkpoint, tmp_path, prompts):
    base = checkpoint("llama")
    (tmp_path / "p.txt").write_text(prompts[0])
    code = main(["upcycle", str(base), str(tmp_path / "o"), "--donor", str(base), "--donor", str(base), "--prompts", str(tmp_path / "p.txt"),
                 "--prompts", str(tmp_path / "p.txt"), "--granularity", "2", "--top-k", "2", "--shared", "2", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["verdict"] == "exact"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'# moesurgery upcycle BASE OUT --recipe r.toml\ncommand = "upcycle"\n[options]\ngranularity = 2\ntop_k = 2\nshared = 2\n'
                      f'[[donors]]\nsource = "{base}"\nprompts = ["w5 w6 w7", "w8 w9"]\n[[donors]]\nsource = "{base}"\nprompts = "p.txt"\n')
    code = main(["upcycle", str(base), str(tmp_path / "d"), "--recipe", str(recipe), "--dry-run", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out)["experts"] == 4
    assert main(["upcycle", str(base), str(tmp_path / "e"), "--prompts", str(tmp_path / "p.txt"), "--granularity", "2"]) == 2
