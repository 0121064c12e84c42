"""prune-experts / merge-experts: router, bias and experts stay consistent in every layout; an expert no input
can select is pruned exactly (proven in transformers); bad requests are one-line errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moesurgery.canonical import MoE, Router, SwiGLU
from moesurgery.cli import main
from moesurgery.lazy import Lazy
from moesurgery.model_io import open_model
from moesurgery.operations import merge_experts, prune_experts
from moesurgery.surgery.prune import cluster_experts, prune_moe, unselectable
from tests.fixtures import MOE_FAMILIES, reference_logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_moe(E, k, H=8, I=4, bias=True, seed=0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    experts = [SwiGLU(*(Lazy.of(torch.randn(*s, generator=g)) for s in ((I, H), (I, H), (H, I)))) for _ in range(E)]
    router = Router(Lazy.of(torch.randn(E, H, generator=g)), k, "sigmoid", True, bias=Lazy.of(torch.randn(E, generator=g)) if bias else None)
    return MoE(router, experts)


@settings(max_examples=30, deadline=None)
@given(E=st.integers(2, 12), data=st.data())
def test_pruning_keeps_router_bias_and_experts_together(E, data):
    moe = tiny_moe(E, 1)
    keep = sorted(data.draw(st.sets(st.integers(0, E - 1), min_size=1, max_size=E)))
    out = prune_moe(moe, keep)
    assert torch.equal(out.router.weight.load(), moe.router.weight.load()[keep])
    assert torch.equal(out.router.bias.load(), moe.router.bias.load()[keep])
    assert [e.gate for e in out.experts] == [moe.experts[e].gate for e in keep]
    assert out.router.top_k == moe.router.top_k and out.shared is moe.shared


def test_unselectable_experts():
    moe = tiny_moe(4, 2)
    moe.router.bias = Lazy.of(torch.tensor([0.5, 0.6, -2.0, -0.4]))
    assert unselectable(moe) == [2]  # experts 0, 1 always score above 0.5 > -2 + 1


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f not in ("deepseek", "deepseek_v3", "glm4_moe")])
def test_prune_in_every_layout_loads_and_is_consistent(checkpoint, tmp_path, family):
    src = checkpoint(family)
    model = open_model(src).model
    E = len(model.moe_layers()[0].ffn.experts)
    report = prune_experts(src, tmp_path / "o", keep=E // 2 if E // 2 >= model.moe_layers()[0].ffn.router.top_k else E - 1,
                           calibration_tokens=256)
    out = open_model(tmp_path / "o").model
    kept = report["kept"]
    for layer, src_layer in zip(out.layers, model.layers):
        if isinstance(layer.ffn, MoE):
            idx = kept[str(layer.index)]
            assert torch.equal(layer.ffn.router.weight.load(), src_layer.ffn.router.weight.load()[idx])
            assert torch.equal(layer.ffn.experts[-1].down.load(), src_layer.ffn.experts[idx[-1]].down.load())
    reference_logits(tmp_path / "o", torch.tensor([[1, 2, 3, 4]]))  # transformers loads it


def test_pruning_an_unselectable_expert_is_exact_in_transformers(checkpoint, input_ids, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint("deepseek_v3", n_group=1, topk_group=1), src)
    t = load_file(src / "model.safetensors")
    for key in [k for k in t if k.endswith("e_score_correction_bias")]:
        b = torch.zeros(8)
        b[5] = -5.0  # expert 5: its score stays below -4, every other expert's above 0
        t[key] = b
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    report = prune_experts(src, tmp_path / "o", keep=7, method="random")
    assert report["expected"] == "exact" and report["verdict"] == "exact"
    assert all(5 not in v for v in report["kept"].values())
    assert rel_err(reference_logits(tmp_path / "o", input_ids), reference_logits(src, input_ids)) < 1e-5


@pytest.mark.parametrize("args,code,message", [
    (["--keep", "0"], 2, "at least 1"),
    (["--keep", "8"], 2, "removes nothing"),
    (["--keep", "1"], 2, "fewer than the router's top-2"),
    (["--fraction", "1.5"], 2, "--fraction"),
    (["--keep", "4", "--fraction", "0.5"], 2, "one of them"),
    (["--keep", "4", "--global"], 2, "--per-layer"),
    (["--keep", "4", "--method", "magic"], 2, "--method"),
])
def test_bad_prune_requests(capsys, checkpoint, tmp_path, args, code, message):
    got = main(["prune-experts", str(checkpoint("olmoe")), str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert got == code and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [(["--centres", "magic"], "--centres"), (["--grouping", "magic"], "--grouping"),
                                          (["--method", "magic"], "--method")])
def test_bad_merge_requests(capsys, checkpoint, tmp_path, args, message):
    src = checkpoint("olmoe")
    capsys.readouterr()  # the fixture's own progress output
    got = main(["merge-experts", str(src), str(tmp_path / "o"), "--into", "4", *args])
    err = capsys.readouterr().err
    assert got == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_dense_source_is_refused(capsys, checkpoint, tmp_path):
    assert main(["prune-experts", str(checkpoint("llama")), str(tmp_path / "o"), "--keep", "2"]) == 3
    assert main(["merge-experts", str(checkpoint("llama")), str(tmp_path / "o"), "--into", "2"]) == 3


def test_clustering_groups_identical_experts():
    a, b = torch.randn(16), torch.randn(16)
    feats = torch.stack([a, b, a * 2, b + 1e-3, a + 1e-3])
    assert sorted(cluster_experts(feats, 2)) == [[0, 2, 4], [1, 3]]


def test_merging_identical_experts_is_close_and_routes_their_mass(checkpoint, tmp_path):
    report = merge_experts(checkpoint("olmoe"), tmp_path / "o", into=4, calibration_tokens=256)
    assert report["experts"] == 4 and all(len(sum(c, [])) == 8 for c in report["clusters"].values())
    out = open_model(tmp_path / "o").model
    assert len(out.moe_layers()[0].ffn.experts) == 4
    reference_logits(tmp_path / "o", torch.tensor([[1, 2, 3, 4]]))


def test_merge_dry_run_and_aligned(checkpoint, tmp_path):
    report = merge_experts(checkpoint("mixtral"), tmp_path / "o", into=2, dry_run=True)
    assert report["dry_run"] and report["experts"] == 2 and not (tmp_path / "o").exists()
    report = merge_experts(checkpoint("mixtral"), tmp_path / "a", into=2, method="aligned", calibration_tokens=256)
    assert 0 <= report["aligned_fit_rel_err"] < 1


def test_merge_centres_by_reap_keep_the_experts_reap_ranks_first(checkpoint, tmp_path):
    """--centres reap: each cluster's centre is its member of highest REAP saliency (the mean over its tokens)."""
    report = merge_experts(checkpoint("mixtral"), tmp_path / "o", into=2, centres="reap", calibration_tokens=256)
    assert report["centres"] == "reap" and len(open_model(tmp_path / "o").model.moe_layers()[0].ffn.experts) == 2


def test_select_merge_of_identical_experts_keeps_each_neuron_once():
    """Two copies of one expert merged by neuron selection: every neuron kept once, the refit down_proj counts it for
    both, so the merged expert computes the copies' common output."""
    from moesurgery.canonical import MoE, Router, SwiGLU
    from moesurgery.lazy import Lazy
    from moesurgery.surgery.prune import select_neurons

    g = torch.Generator().manual_seed(0)
    H, I = 16, 8
    e = SwiGLU(*(Lazy.of(torch.randn(*s, generator=g, dtype=torch.float64)) for s in ((I, H), (I, H), (H, I))))
    moe = MoE(Router(Lazy.of(torch.randn(2, H, generator=g, dtype=torch.float64)), 1), [e, e])
    X = torch.randn(256, H, generator=g, dtype=torch.float64)
    q = (X @ moe.router.weight.load().T).softmax(-1)  # [T, 2] the members' weights; all of it goes to the merged expert
    merged, err = select_neurons(moe, [0, 1], X, q, q.sum(-1), ridge=1e-9)
    assert err < 1e-6
    torch.testing.assert_close(merged.gate.load(), e.gate.load())


def test_select_merge_of_disjoint_halves_beats_averaging(checkpoint):
    """Experts that are disjoint neuron sets of one FFN (a split dense model): selecting the union's strongest neurons
    and refitting down_proj reproduces the cluster's output better than averaging the weights."""
    from moesurgery.canonical import MoE, Router, SwiGLU
    from moesurgery.lazy import Lazy
    from moesurgery.surgery.prune import expert_outputs, merge_moe

    g = torch.Generator().manual_seed(1)
    H, I = 16, 8
    experts = [SwiGLU(*(Lazy.of(torch.randn(*s, generator=g)) for s in ((I, H), (I, H), (H, I)))) for _ in range(2)]
    moe = MoE(Router(Lazy.of(torch.zeros(2, H)), 2), experts)
    X = torch.randn(512, H, generator=g)
    want = expert_outputs(X, moe).sum(0) / 2  # uniform routing: the cluster's output is the members' mean
    errs = {}
    for method in ("select", "frequency"):
        merged, _ = merge_moe(moe, [[0, 1]], torch.ones(2), X, method)
        got = expert_outputs(X, MoE(moe.router, merged.experts))[0]
        errs[method] = float((got - want).norm() / want.norm())
    assert errs["select"] < 0.8 * errs["frequency"], errs


def test_merge_centres_follow_the_given_rank():
    """grouping dominant: the centres (and so the kept router rows and selection biases) are the experts of highest
    rank: the most used by default, the most routed output with `rank`; the merged weights still use frequencies."""
    from moesurgery.canonical import MoE, Router, SwiGLU
    from moesurgery.lazy import Lazy
    from moesurgery.surgery.prune import group_experts, merge_moe

    g = torch.Generator().manual_seed(2)
    H, I, E = 8, 4, 4
    experts = [SwiGLU(*(Lazy.of(torch.randn(*s, generator=g)) for s in ((I, H), (I, H), (H, I)))) for _ in range(E)]
    W = torch.randn(E, H, generator=g)
    moe = MoE(Router(Lazy.of(W), 2, scoring="sigmoid", bias=Lazy.of(torch.arange(E, dtype=torch.float32))), experts)
    X = torch.randn(64, H, generator=g)
    feats = torch.randn(E, 16, H, generator=g)
    freq, output = torch.tensor([9.0, 1.0, 8.0, 2.0]), torch.tensor([1.0, 9.0, 2.0, 8.0])
    by_freq = [sorted(m) for m in group_experts(feats, 2, freq)]
    by_output = [sorted(m) for m in group_experts(feats, 2, output)]
    assert {m[int(freq[m].argmax())] for m in by_freq} == {0, 2}
    assert {m[int(output[m].argmax())] for m in by_output} == {1, 3}
    merged, _ = merge_moe(moe, by_output, freq, X, "frequency", router="centre", rank=output)
    centres = [m[int(output[m].argmax())] for m in by_output]
    torch.testing.assert_close(merged.router.weight.load(), W[centres])
    torch.testing.assert_close(merged.router.bias.load(), torch.tensor(centres, dtype=torch.float32))
