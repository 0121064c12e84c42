"""Surgery: exact paths proven with transformers logits; partitions and exactness as properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesurgery.canonical import MoE, Router, SwiGLU
from moesurgery.errors import BadInputError, UsageError
from moesurgery.lazy import Lazy
from moesurgery.model_io import open_model
from moesurgery.operations import split_experts, upcycle
from moesurgery.runtime import Runtime
from moesurgery.runtime.model import ffn_forward, load_ffn
from moesurgery.surgery.finer import finer_experts
from moesurgery.surgery.partition import METHODS, partition
from moesurgery.surgery.upcycle import UpcycleSpec, upcycle_dense
from tests.fixtures import deepseek_v1_reference_logits, reference_logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def logits_of(path: Path, ids):
    family = json.loads((path / "config.json").read_text())["model_type"]
    return deepseek_v1_reference_logits(path, ids) if family == "deepseek" else reference_logits(path, ids)


# ------------------------------------------------------------------ exact paths, in transformers
def test_mixtral_finer_experts_in_qwen2_moe(checkpoint, input_ids, tmp_path):
    src = checkpoint("mixtral")
    report = split_experts(src, tmp_path / "out", granularity=4, to="qwen2_moe")
    assert report["verdict"] == "exact" and report["experts"] == 16 and report["top_k"] == 8
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(src, input_ids)) < 1e-5


def test_mixtral_finer_experts_in_deepseek_v1_with_our_runtime(checkpoint, input_ids, tmp_path):
    src = checkpoint("mixtral")
    split_experts(src, tmp_path / "out", granularity=2, to="deepseek")
    ours = Runtime(open_model(tmp_path / "out").model).forward(input_ids)
    assert rel_err(ours, logits_of(src, input_ids)) < 1e-5
    assert rel_err(deepseek_v1_reference_logits(tmp_path / "out", input_ids), logits_of(src, input_ids)) < 1e-5


def test_dense_llama_to_glm4_moe_virtual_groups_and_shared(checkpoint, input_ids, tmp_path):
    src = checkpoint("llama")  # FFN width 128 = (G 2 + S 2) x 32
    report = upcycle(src, tmp_path / "out", granularity=2, experts=8, top_k=4, shared=2, to="glm4_moe")
    assert report["verdict"] == "exact" and report["shared_width"] == 64
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["partial_rotary_factor"] == 1.0 and cfg["head_dim"] == 16 and cfg["n_shared_experts"] == 2
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(src, input_ids)) < 1e-5


def test_dense_to_qwen2_moe_with_gated_shared_expert(checkpoint, input_ids, tmp_path):
    src = checkpoint("qwen2")
    report = upcycle(src, tmp_path / "out", granularity=2, experts=6, top_k=2, shared=2, to="qwen2_moe")
    assert report["verdict"] == "exact"
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(src, input_ids)) < 1e-5


def test_dense_upcycle_to_deepseek_v1_and_first_k_dense(checkpoint, input_ids, tmp_path):
    src = checkpoint("llama")
    report = upcycle(src, tmp_path / "out", granularity=4, experts=8, top_k=4, first_k_dense=1)
    assert report["verdict"] == "exact" and report["moe_layers"] == 1
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(src, input_ids)) < 1e-5


def test_mixtral_with_identical_neurons_gives_exact_shared_experts(checkpoint, input_ids, tmp_path):
    """Neurons equal in every expert (as after dense upcycling) become shared experts exactly."""
    from safetensors.torch import load_file, save_file
    import shutil

    src = tmp_path / "src"
    shutil.copytree(checkpoint("mixtral"), src)
    tensors = load_file(src / "model.safetensors")
    for key in list(tensors):
        if ".experts." in key and not key.split(".experts.")[1].startswith("0."):
            ref = tensors[key.replace(".experts." + key.split(".experts.")[1].split(".")[0] + ".", ".experts.0.")]
            cols = slice(0, 12)  # the first 12 neurons of every expert equal expert 0's
            if key.endswith("w2.weight"):
                tensors[key][:, cols] = ref[:, cols]
            else:
                tensors[key][cols] = ref[cols]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    report = upcycle(src, tmp_path / "out", granularity=4, shared=1)  # expert width 48: 12 neurons shared
    assert report["verdict"] == "exact", report["lossy_reasons"]
    assert report["experts"] == 4 * 3 and report["top_k"] == 2 * 3 and report["shared_width"] == 12
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(src, input_ids)) < 1e-5


def test_random_mixtral_shared_extraction_is_measured_lossy(checkpoint, tmp_path):
    report = upcycle(checkpoint("mixtral"), tmp_path / "out", granularity=4, shared=1, to="deepseek")
    assert report["verdict"] == "lossy" and report["check"]["rel_err"] > 1e-3
    assert "shared_min_similarity" in report["measured"][0]


def test_symmetry_breaking_is_reported_lossy(checkpoint, tmp_path):
    report = upcycle(checkpoint("llama"), tmp_path / "out", granularity=2, experts=4, top_k=2, shared=2, router_noise=0.01, reinit_fraction=0.25)
    assert report["verdict"] == "lossy" and len(report["lossy_reasons"]) == 2


def test_grouped_sigmoid_finer_split_is_refused_then_allowed(checkpoint, tmp_path):
    with pytest.raises(BadInputError, match="4 expert groups, 2 kept"):
        split_experts(checkpoint("deepseek_v3"), tmp_path / "out", granularity=2)
    assert not (tmp_path / "out").exists()
    report = split_experts(checkpoint("deepseek_v3"), tmp_path / "out", granularity=2, allow_lossy=True)
    assert report["expected"] == "lossy" and "group" in report["lossy_reasons"][0]


@pytest.mark.parametrize("method", METHODS)
def test_moefy_every_method_measures_its_loss(checkpoint, tmp_path, method):
    report = split_experts(checkpoint("llama"), tmp_path / "out", experts=6, top_k=3, shared=2, method=method,
                           router="fitted", calibration_text="The quick brown fox jumps over the lazy dog. " * 40)
    assert report["verdict"] == "lossy" and report["expected"] == "lossy"
    for m in report["measured"]:
        assert 0 < m["rel_err"] < 1.5 and 0 <= m["oracle_rel_err"] <= m["rel_err"] + 1e-6
    # the quick check runs on calibration hidden states, not on N(0, 1) noise the router never saw
    assert report["check"]["inputs"].endswith("calibration hidden states per layer")
    assert [l["index"] for l in report["check"]["layers"]] == [m["index"] for m in report["measured"]][: len(report["check"]["layers"])]


def test_moefy_with_all_experts_active_is_exact(checkpoint, tmp_path):
    report = split_experts(checkpoint("llama"), tmp_path / "out", experts=4, top_k=4, method="random", router="random")
    assert report["check"]["rel_err"] < 0.05  # only the near-uniform routing weights differ


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(granularity=3, experts=6, top_k=3), "split into"),  # 128 % (3+0)
        (dict(granularity=2, experts=5, top_k=2), "multiple of --granularity"),
        (dict(granularity=2, experts=4, top_k=3), "top-k 3 must be a multiple"),
        (dict(granularity=2, experts=4, top_k=6), "larger than"),
        (dict(granularity=2), "--experts N --top-k K"),
    ],
)
def test_upcycle_validation(checkpoint, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        upcycle(checkpoint("llama"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_split_validation(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="does not divide"):
        split_experts(checkpoint("mixtral"), tmp_path / "o", granularity=5)
    with pytest.raises(UsageError, match="calibration"):
        split_experts(checkpoint("llama"), tmp_path / "o", experts=4, top_k=2, method="coactivation")
    with pytest.raises(UsageError, match="larger than"):
        split_experts(checkpoint("llama"), tmp_path / "o", experts=4, top_k=5)
    with pytest.raises(BadInputError, match="cannot express"):
        split_experts(checkpoint("mixtral"), tmp_path / "o", granularity=2, to="glm4_moe")
    with pytest.raises(BadInputError, match="dense layout"):
        upcycle(checkpoint("llama"), tmp_path / "o", granularity=2, experts=4, top_k=2, to="llama")


def test_dry_run_writes_nothing(checkpoint, tmp_path):
    report = upcycle(checkpoint("llama"), tmp_path / "out", granularity=2, experts=4, top_k=2, shared=2, dry_run=True)
    assert report["expected"] == "exact" and "check" not in report and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ properties
def random_swiglu(width: int, hidden: int, seed: int) -> SwiGLU:
    g = torch.Generator().manual_seed(seed)
    return SwiGLU(*(Lazy.of(torch.randn(s, generator=g) * 0.3) for s in ((width, hidden), (width, hidden), (hidden, width))))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), per=st.integers(1, 6), method=st.sampled_from(["contiguous", "random", "kmeans", "coactivation"]), seed=st.integers(0, 99))
def test_partitions_use_each_neuron_exactly_once(n, per, method, seed):
    width = n * per
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(width, 8, generator=g), torch.randn(width, 8, generator=g)
    active = torch.rand(20, width, generator=g) > 0.5
    neurons = torch.randperm(width, generator=g)
    groups = partition(method, neurons, n, gate=gate, up=up, active=active, seed=seed)
    assert len(groups) == n and all(len(x) == per for x in groups)
    assert sorted(torch.cat(groups).tolist()) == sorted(neurons.tolist())


@settings(max_examples=25, deadline=None)
@given(E=st.integers(1, 6), k=st.integers(1, 6), m=st.sampled_from([1, 2, 3, 4]), per=st.integers(1, 4), H=st.integers(2, 12),
       scoring=st.sampled_from(["softmax", "sigmoid"]), renorm=st.booleans(), seed=st.integers(0, 999))
def test_finer_experts_exact_for_random_shapes(E, k, m, per, H, scoring, renorm, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    experts = [random_swiglu(m * per, H, seed + j) for j in range(E)]
    router = Router(Lazy.of(torch.randn(E, H, generator=g)), k, scoring, renorm, scaling=1.5)
    moe = MoE(router, experts, random_swiglu(per, H, seed + 99))
    finer, lossy = finer_experts(moe, m)
    x = torch.randn(16, H, generator=g)
    want, got = ffn_forward(x, load_ffn(moe)), ffn_forward(x, load_ffn(finer))
    assert not lossy and torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@settings(max_examples=25, deadline=None)
@given(G=st.integers(1, 4), groups=st.integers(1, 4), t=st.integers(1, 4), S=st.integers(0, 3), f=st.integers(1, 4), H=st.integers(2, 12),
       scoring=st.sampled_from(["softmax", "sigmoid"]), scaling=st.booleans(), seed=st.integers(0, 999))
def test_dense_upcycle_exact_for_random_shapes(G, groups, t, S, f, H, scoring, scaling, seed):
    t = min(t, groups)
    ffn = random_swiglu((G + S) * f, H, seed)
    spec = UpcycleSpec(G, G * groups, G * t, S, scoring, fold_into_scaling=scaling, seed=seed)
    moe, lossy = upcycle_dense(ffn, spec)
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(seed))
    want, got = ffn_forward(x, load_ffn(ffn)), ffn_forward(x, load_ffn(moe))
    assert not lossy and torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_mtp_layers_are_kept_by_convert_and_dropped_by_surgery(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from moesurgery.convert import convert
    from moesurgery.reader import CheckpointReader

    src = tmp_path / "src"
    shutil.copytree(checkpoint("deepseek_v3"), src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)  # an MTP layer beyond num_hidden_layers
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert(src, tmp_path / "same", "deepseek_v3")
    assert "model.layers.3.eh_proj.weight" in CheckpointReader(tmp_path / "same")
    report = split_experts(src, tmp_path / "fine", granularity=2, allow_lossy=True)
    assert any("multi-token-prediction" in n for n in report["notes"])
    assert "model.layers.3.eh_proj.weight" not in CheckpointReader(tmp_path / "fine")
    assert json.loads((tmp_path / "fine" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_mixtral_first_k_dense_is_mean_of_experts_and_measured(checkpoint, tmp_path):
    report = upcycle(checkpoint("mixtral"), tmp_path / "out", granularity=2, first_k_dense=1)
    assert report["verdict"] == "lossy" and report["moe_layers"] == 1
    assert any("mean of their experts" in r for r in report["lossy_reasons"])
    model = open_model(tmp_path / "out").model
    assert isinstance(model.layers[0].ffn, SwiGLU) and model.layers[0].ffn.width == 4 * 48
    assert report["check"]["layers"][1]["rel_err"] < 1e-5  # the MoE layer is still exact


def test_weight_only_split_points_to_calibration(checkpoint, tmp_path):
    report = split_experts(checkpoint("llama"), tmp_path / "out", experts=6, top_k=3, shared=2, dry_run=True)
    assert any("--calibration pydoc" in n for n in report["notes"])
    report = split_experts(checkpoint("llama"), tmp_path / "out", experts=6, top_k=3, shared=2, method="coactivation", router="fitted",
                           calibration_text="The quick brown fox jumps over the lazy dog. " * 40, dry_run=True)
    assert not any("--calibration pydoc" in n for n in report["notes"])


def test_sequential_calibration_feeds_later_layers_the_split_model_inputs(checkpoint, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    kw = dict(experts=6, top_k=2, shared=2, method="coactivation", router="fitted", calibration_text=text)
    plain = split_experts(checkpoint("llama"), tmp_path / "a", **kw)
    seq = split_experts(checkpoint("llama"), tmp_path / "b", sequential=True, **kw)
    a, b = plain["measured"], seq["measured"]
    assert a[0]["rel_err"] == pytest.approx(b[0]["rel_err"], rel=1e-6)  # layer 0 sees the same inputs
    assert any(abs(x["rel_err"] - y["rel_err"]) > 1e-6 for x, y in zip(a[1:], b[1:]))  # later layers do not


def test_calibration_stream_follows_sent_replacements(checkpoint):
    """ffn_inputs.send(ffn): the stream continues through the replacement FFN."""
    from moesurgery.calibration import ffn_inputs
    from moesurgery.model_io import open_model
    from moesurgery.surgery.moefy import MoefySpec, moefy

    model = open_model(checkpoint("llama")).model
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = [x for _, x in ffn_inputs(model, ids)]
    stream = ffn_inputs(model, ids)
    i, x0 = next(stream)
    moe, _ = moefy(model.layers[0].ffn, MoefySpec(4, 1, 0, "random", "random", "softmax", 0), x0, 0)
    _, x1 = stream.send(moe)
    torch.testing.assert_close(x0, dense[0])
    assert not torch.allclose(x1, dense[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_calibration_on_cuda_without_cuda_is_a_usage_error(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--device cuda"):
        split_experts(checkpoint("llama"), tmp_path / "out", experts=6, top_k=3, shared=2, method="coactivation", router="fitted",
                      calibration_text="The quick brown fox jumps over the lazy dog. " * 40, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_calibration_on_cuda_matches_cpu(checkpoint, tmp_path):
    kw = dict(experts=6, top_k=3, shared=2, method="coactivation", router="fitted", calibration_text="The quick brown fox jumps over the lazy dog. " * 40)
    a = split_experts(checkpoint("llama"), tmp_path / "a", **kw)
    b = split_experts(checkpoint("llama"), tmp_path / "b", device="cuda", **kw)
    assert [m["rel_err"] for m in a["measured"]] == pytest.approx([m["rel_err"] for m in b["measured"]], rel=1e-3)


def test_non_sequential_split_takes_any_iterator_of_inputs(monkeypatch, checkpoint, tmp_path):
    """Regression: the plain path advanced the calibration stream with send(None), which only
    generators have; callers (benchmarks/quality.py) hand in cached lists' iterators."""
    from moesurgery import calibration

    real = calibration.ffn_inputs
    monkeypatch.setattr(calibration, "ffn_inputs", lambda *a, **kw: iter(list(real(*a, **kw))))
    report = split_experts(checkpoint("llama"), tmp_path / "out", experts=6, top_k=3, shared=2, method="coactivation", router="fitted",
                           calibration_text="The quick brown fox jumps over the lazy dog. " * 40)
    assert report["verdict"] == "lossy" and len(report["measured"]) == 2
