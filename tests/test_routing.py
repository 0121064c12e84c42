"""Routing statistics (inspect --text): counts, mass, REAP, imbalance, co-activation against a per-token
reference computed the slow way."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from moesurgery.cli import main
from moesurgery.model_io import open_model
from moesurgery.routing import expert_stats, layer_summary
from moesurgery.runtime.model import load_ffn
from moesurgery.runtime.moe import route


def reference(h, moe):
    """Token by token: its top-k experts, their weights, each expert's own output."""
    w = load_ffn(moe)
    E = w.num_experts
    counts, mass, reap_sum = torch.zeros(E), torch.zeros(E), torch.zeros(E)
    co = torch.zeros(E, E)
    for x in h:
        idx, wt = route(x[None], w.router, w.router_weight, w.bias)
        for j, e in enumerate(idx[0].tolist()):
            g, u, d = moe.experts[e].gate.load(), moe.experts[e].up.load(), moe.experts[e].down.load()
            y = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
            counts[e] += 1
            mass[e] += wt[0, j]
            reap_sum[e] += wt[0, j] * y.norm()
            for e2 in idx[0].tolist():
                if e2 != e:
                    co[e, e2] += 1
    return counts, mass, torch.where(counts > 0, reap_sum / counts.clamp(min=1), 0 * counts), co


def test_statistics_match_a_per_token_reference(checkpoint):
    model = open_model(checkpoint("deepseek_v3", n_group=1, topk_group=1)).model  # sigmoid + bias, shared expert
    moe = model.layers[1].ffn
    h = torch.randn(40, model.arch.hidden_size, generator=torch.Generator().manual_seed(3))
    got = expert_stats(h, moe)
    counts, mass, reap, co = reference(h, moe)
    torch.testing.assert_close(got["counts"].float(), counts)
    torch.testing.assert_close(got["mass"].float(), mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["reap"].float(), reap, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["coactivation"].float(), co)
    s = layer_summary(got, moe.router.top_k)
    assert s["tokens"] == 40 and sum(s["counts"]) == 40 * moe.router.top_k
    assert s["max_over_mean"] >= 1 and 0 <= s["entropy"] <= 1
    assert s["dead"] == [e for e in range(len(counts)) if counts[e] == 0]


def test_inspect_text_adds_routing_per_layer(capsys, checkpoint, tmp_path):
    code = main(["inspect", str(checkpoint("mixtral")), "--text", "pydoc", "--tokens", "300", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routing"]["tokens"] == 256  # whole sequences of 256
    for layer in report["layers"]:
        r = layer["routing"]
        assert set(r) >= {"counts", "mass", "reap", "max_over_mean", "cv", "entropy", "dead", "coactivation_top_pairs"}
        assert len(r["counts"]) == layer["num_experts"]


def test_inspect_routing_errors(capsys, checkpoint):
    assert main(["inspect", str(checkpoint("llama")), "--text", "pydoc"]) == 3  # dense
    assert main(["inspect", str(checkpoint("mixtral")), "--tokens", "5"]) == 2  # --tokens without --text
    assert main(["inspect", str(checkpoint("mixtral")), "--text", "pydoc", "--plot", "/tmp/x.png"]) in (0, 2)  # 2 without matplotlib
