"""gpt-oss (issue #12): biased linear router (softmax over the top-k logits), clamped SwiGLU experts with biases on
both projections, fused transposed interleaved on disk; attention sinks, alternating sliding / full layers, YaRN.

Proof as for the other families: tiny checkpoints made with transformers' classes (prompts of 12 tokens, sliding
window 4, the clamp active in layer 0); our runtime equals them, decodes incrementally to the same logits,
converts to its own layout byte for byte, and splits finer exactly in transformers, down biases included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesurgery.canonical import Activation, MoE, Router, SwiGLU
from moesurgery.convert import convert
from moesurgery.errors import BadInputError
from moesurgery.lazy import Lazy
from moesurgery.model_io import open_model
from moesurgery.operations import merge_experts, prune_experts, split_experts, upcycle
from moesurgery.runtime import Runtime
from moesurgery.runtime.model import load_ffn
from moesurgery.runtime.moe import moe_forward
from moesurgery.surgery.finer import finer_experts
from moesurgery.verify import verify
from tests.gpt_oss_fixtures import VOCAB, gpt_oss_logits, make_gpt_oss
from tests.test_lineage import rel_err, stored


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_gpt_oss(tmp_path_factory.mktemp("gpt_oss") / "src")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_runtime_matches_transformers(src, ids):
    model = open_model(src).model
    assert model.arch.layer_types == ["sliding_attention", "full_attention"] * 2 and model.arch.sliding_window == 4
    assert rel_err(Runtime(model).forward(ids), gpt_oss_logits(src, ids)) < 1e-5


def test_sinks_window_and_clamp_act(src, ids):
    """The features are exercised: without sinks, without the window, without the clamp the logits move."""
    full = Runtime(open_model(src).model).forward(ids)
    m = open_model(src).model
    m.arch.sliding_window = None
    assert rel_err(Runtime(m).forward(ids), full) > 1e-3
    m = open_model(src).model
    for layer in m.layers:
        layer.attn = {k: v for k, v in layer.attn.items() if not k.endswith("sinks")}
    assert rel_err(Runtime(m).forward(ids), full) > 1e-3
    m = open_model(src).model
    m.layers[0].ffn.act = Activation("gpt_oss", limit=1e9)
    assert rel_err(Runtime(m).forward(ids), full) > 1e-3


def test_incremental_decoding_matches_full_forward(src, ids):
    rt = Runtime(open_model(src).model, resident=True)
    full = rt.forward(ids)
    caches: list = []
    steps = [rt.forward(ids[:, :5], caches)] + [rt.forward(ids[:, t : t + 1], caches) for t in range(5, ids.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_same_layout_convert_is_byte_identical(src, tmp_path):
    assert convert(src, tmp_path / "out", "gpt_oss")["exact"]
    a, b = stored(src), stored(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


def test_finer_experts_exact_in_transformers(src, ids, tmp_path):
    report = split_experts(src, tmp_path / "out", granularity=2)
    assert report["verdict"] == "exact", report
    assert rel_err(gpt_oss_logits(tmp_path / "out", ids), gpt_oss_logits(src, ids)) < 1e-5
    assert verify(src, tmp_path / "out")["verdict"] == "exact"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (16, 4, 32)


@settings(max_examples=25, deadline=None)
@given(E=st.integers(2, 6), k=st.integers(1, 2), m=st.sampled_from([2, 4]), seed=st.integers(0, 10_000))
def test_each_slice_keeps_the_down_bias_under_renormalised_weights(E, k, m, seed):
    """Why the finer split is exact with a down bias b: the m slices of an expert tie on their logit, so all m are
    chosen together and each gets w/m of the softmax over the (k m) top logits; each slice's down_proj carries
    the factor m, so sum_j (w/m)(m down_j act_j + b) = w (down act + b): every slice keeps the whole bias."""
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    H, I = 8, 4 * m

    def t(*s):
        return Lazy.of(torch.randn(*s, generator=g, dtype=torch.float64))

    experts = [SwiGLU(t(I, H), t(I, H), t(H, I), t(I), t(I), t(H)) for _ in range(E)]
    moe = MoE(Router(t(E, H), k, logit_bias=t(E)), experts, act=Activation("gpt_oss", limit=1.5))
    fine, lossy = finer_experts(moe, m)
    assert not lossy and len(fine.experts) == E * m and fine.router.top_k == k * m
    x = torch.randn(32, H, generator=g, dtype=torch.float64) * 2
    want = moe_forward(x, load_ffn(moe, dtype=torch.float64))
    got = moe_forward(x, load_ffn(fine, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_prune_and_merge_load_in_transformers(src, ids, tmp_path):
    report = prune_experts(src, tmp_path / "p", keep=6, calibration_tokens=256)
    assert report["verdict"] == "lossy" and report["experts"] == 6
    gpt_oss_logits(tmp_path / "p", ids)
    report = merge_experts(src, tmp_path / "m", into=6, calibration_tokens=256)
    assert report["experts"] == 6 and report["check"]["rel_err"] < 1
    assert rel_err(Runtime(open_model(tmp_path / "m").model).forward(ids), gpt_oss_logits(tmp_path / "m", ids)) < 1e-5


def test_shared_experts_have_no_slot(src, tmp_path):
    with pytest.raises(BadInputError, match="has no shared experts"):
        upcycle(src, tmp_path / "out", granularity=2, shared=1, to="gpt_oss", allow_lossy=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dst", ["mixtral", "qwen2_moe"])
def test_other_expert_kinds_refused(src, tmp_path, dst):
    with pytest.raises(BadInputError, match="experts cannot be converted|attention"):
        convert(src, tmp_path / "out", dst, allow_lossy=True)


# ------------------------------------------------------------------------------------ MXFP4
@pytest.fixture(scope="module")
def mx(tmp_path_factory) -> Path:
    from tests.gpt_oss_fixtures import make_gpt_oss_mxfp4

    return make_gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss_mx") / "src")


def test_mxfp4_decoded_as_transformers_does(mx):
    """Our decoding of the release format equals transformers' dequantized parameters, bit for bit."""
    import transformers

    ours = open_model(mx).model.layers[1].ffn.experts[3]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(mx), dtype=torch.bfloat16).model.layers[1].mlp.experts
    gate_up, down = theirs.gate_up_proj[3], theirs.down_proj[3]  # [H, 2I], [I, H]
    assert torch.equal(ours.gate.load(), gate_up[:, 0::2].T) and torch.equal(ours.up.load(), gate_up[:, 1::2].T)
    assert torch.equal(ours.down.load(), down.T)


def raw(path: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor, as stored (MXFP4 blocks and scales included)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def test_mxfp4_same_layout_convert_is_byte_identical(mx, tmp_path):
    assert convert(mx, tmp_path / "out", "gpt_oss")["exact"]
    a, b = raw(mx), raw(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"


def test_mxfp4_runtime_and_finer_experts_stay_mxfp4(mx, ids, tmp_path):
    """Halves of 64 inputs are whole groups of 32: the finer experts keep the source's bytes; the x2 folded into
    down_proj goes into its E8M0 scales (+1)."""
    ref = gpt_oss_logits(mx, ids)
    assert rel_err(Runtime(open_model(mx).model).forward(ids), ref) < 1e-5
    report = split_experts(mx, tmp_path / "fine", granularity=2)
    assert report["verdict"] == "exact" and any(n.startswith("written as MXFP4") for n in report["notes"])
    assert rel_err(gpt_oss_logits(tmp_path / "fine", ids), ref) < 1e-5
    a, b = raw(mx), raw(tmp_path / "fine")
    key = "model.layers.0.mlp.experts."
    assert torch.equal(b[key + "gate_up_proj_blocks"][0], a[key + "gate_up_proj_blocks"][0][:64])  # gate/up pairs of neurons 0..31
    assert torch.equal(b[key + "down_proj_blocks"][1], a[key + "down_proj_blocks"][0][:, 1:2])  # expert 0's second half of inputs
    assert torch.equal(b[key + "down_proj_scales"][1].int(), a[key + "down_proj_scales"][0][:, 1:2].int() + 1)


def test_mxfp4_tensors_without_their_config_are_refused(mx, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mx, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="MXFP4"):
        open_model(bad)
