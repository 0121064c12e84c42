"""`moesurgery bench`: the --json schema, synthetic shapes, the spot check, cost model, errors.

Everything here runs on tiny shapes with `--quick` (small roofline probes, one timed run per point)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moesurgery import cli
from moesurgery.bench import BenchOptions, expected_touched, ffn_cost, run_bench
from moesurgery.canonical import MoE
from moesurgery.cli import main
from moesurgery.runtime.model import load_ffn
from moesurgery.synthetic import SHAPES, layout_candidate, scaled_shape, synthetic_model

ROW = {"seconds", "tokens_per_s", "gbps", "tflops", "roofline_seconds", "roofline_fraction"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOESURGERY_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))
    monkeypatch.setitem(cli.state, "debug", False)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def check_rows(rows: list[dict], key: str, values: list[int]) -> None:
    assert [r[key] for r in rows] == values
    for r in rows:
        assert ROW <= set(r)
        assert all(isinstance(r[f], float) and math.isfinite(r[f]) and r[f] >= 0 for f in ROW)
        assert r["seconds"] > 0 and r["roofline_fraction"] == pytest.approx(r["roofline_seconds"] / r["seconds"])


def test_bench_json_schema(capsys):
    code, out, err = run(capsys, "bench", "tiny:mixtral", "--granularity", "4", "--tokens", "1,8", "--batch", "1,2", "--context", "4",
                         "--quick", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {"device", "dtype", "backend", "roofline", "models", "ratios", "check"} <= set(r)
    assert (r["device"], r["dtype"], r["backend"]) == ("cpu", "float32", "auto")
    assert r["roofline"]["bandwidth_gbps"] > 0 and r["roofline"]["peak_tflops"] > 0
    src, cand = r["models"]
    assert (src["name"], src["layout"], src["experts"], src["top_k"]) == ("tiny:mixtral", "mixtral", 8, 2)
    assert (cand["experts"], cand["top_k"]) == (32, 8)
    for m in r["models"]:
        check_rows(m["block"], "tokens", [1, 8])
        check_rows(m["prefill"], "tokens", [1, 8])
        check_rows(m["decode"], "batch", [1, 2])
        assert m["backend_rel_err"] < 1e-5
    (ratio,) = r["ratios"]
    assert ratio["candidate"] == cand["name"]
    assert [x["tokens"] for x in ratio["block"]] == [1, 8] and [x["batch"] for x in ratio["decode"]] == [1, 2]
    assert ratio["block"][0]["time_ratio"] == pytest.approx(cand["block"][0]["seconds"] / src["block"][0]["seconds"])
    (check,) = r["check"]
    assert check["candidate"] == cand["name"] and check["verdict"] == "exact" and check["rel_err"] < 1e-5


def test_bench_checkpoints_and_human_output(capsys, tmp_path):
    """A surgery output on disk as CANDIDATE; the human report says whether it is the same function."""
    out = tmp_path / "fine"
    assert run(capsys, "split-experts", "tiny:mixtral", str(out), "--granularity", "2", "--json")[0] == 0
    code, text, err = run(capsys, "bench", "tiny:mixtral", str(out), "--tokens", "2", "--measure", "block,decode", "--batch", "1",
                          "--context", "2", "--layers", "2", "--backend", "sorted", "--quick")
    assert code == 0, err
    assert "roofline measured now" in text and "MoE block" in text and "decode" in text and "prefill" not in text
    assert "exact: computes the source's function" in text


def test_layers_subset():
    r = run_bench("tiny:mixtral", options=BenchOptions(tokens=(2,), parts=("prefill",), layers=1, quick=True, check=False))
    assert r["models"][0]["layers"] == 1 and r["models"][0]["block"] == [] and len(r["models"][0]["prefill"]) == 1


def test_synthetic_shared_candidate_is_exact():
    o = BenchOptions(tokens=(1, 4), parts=("block",), quick=True)
    r = run_bench(None, synthetic="mixtral-8x7b", scale=64, granularity=4, shared=1, options=o)
    src, cand = r["models"]
    assert (src["experts"], src["top_k"], src["expert_width"]) == (8, 2, 256)
    assert (cand["experts"], cand["top_k"], cand["expert_width"], cand["shared_width"]) == (24, 6, 64, 64)
    assert r["check"][0]["verdict"] == "exact"


def test_synthetic_shapes_build_and_scale():
    for name in SHAPES:
        s = scaled_shape(name, 32)
        model = synthetic_model(name, scale=32, layers=1)
        moe = model.layers[0].ffn
        assert isinstance(moe, MoE) and len(moe.experts) == s.experts and moe.router.top_k == s.top_k
        assert model.arch.hidden_size == s.hidden and moe.expert_width == s.expert_width
    assert scaled_shape("mixtral-8x7b", 4).hidden == 1024 and scaled_shape("mixtral-8x7b", 4).expert_width == 3584
    assert scaled_shape("deepseek-v3").experts == 256


def test_layout_candidate_shares_weights_exactly():
    model = synthetic_model("qwen3-30b-a3b", scale=32, layers=1)
    cand, lossy = layout_candidate(model, granularity=2)
    assert lossy == []
    x = torch.randn(16, model.arch.hidden_size)
    from moesurgery.runtime.moe import moe_forward

    a, b = load_ffn(model.layers[0].ffn), load_ffn(cand.layers[0].ffn)
    assert ((moe_forward(x, a, "sorted") - moe_forward(x, b, "sorted")).abs().max() / moe_forward(x, a).abs().max()) < 1e-5


def test_cost_model():
    assert expected_touched(8, 2, 1) == pytest.approx(2)
    assert expected_touched(64, 16, 4096) == pytest.approx(64)
    m = load_ffn(synthetic_model("mixtral-8x7b", scale=64, layers=1).layers[0].ffn)
    H, f, b = 64, 256, 4
    assert tuple(m.down.shape) == (8, H, f)
    nbytes, flops = ffn_cost(m, 1, touched=2)
    assert nbytes == (2 * 3 * H * f + 8 * H + 2 * H) * b
    assert flops == 2 * H * (3 * 2 * f + 8)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--synthetic", "mixtral-8x7b", "tiny:mixtral"], "give no SOURCE"),
        (["--synthetic", "gpt-5"], "unknown shape"),
        ([], "SOURCE"),
        (["tiny:mixtral", "--backend", "fast"], "--backend"),
        (["tiny:mixtral", "--measure", "train"], "--measure"),
        (["tiny:mixtral", "--tokens", "a,b"], "--tokens"),
        (["tiny:mixtral", "--shared", "1"], "--granularity"),
        (["--synthetic", "mixtral-8x7b", "--scale", "64", "--granularity", "2", "--shared", "2"], "smaller than"),
        (["tiny:llama", "--granularity", "2"], "MoE source"),
    ],
)
def test_usage_errors_exit_2(capsys, args, needle):
    code, out, err = run(capsys, "bench", *args, "--quick")
    assert code == 2 and out == "" and err.startswith("error: ") and needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_device_without_cuda_exit_2(capsys):
    code, _, err = run(capsys, "bench", "tiny:mixtral", "--device", "cuda", "--quick")
    assert code == 2 and "no CUDA device" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bench_cuda_smoke(capsys):
    code, out, err = run(capsys, "bench", "--synthetic", "mixtral-8x7b", "--scale", "16", "--granularity", "8", "--device", "cuda",
                         "--tokens", "1,64", "--batch", "1", "--context", "8", "--quick", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["dtype"] == "bfloat16" and r["check"][0]["verdict"] == "exact"


def test_bf16_rounding_between_backends_is_not_a_warning(capsys):
    """Regression: the backend-vs-loop warning used fp32's threshold for every dtype, so bf16 runs
    warned about ordinary rounding (4.7e-3)."""
    code, out, err = run(capsys, "bench", "--synthetic", "mixtral-8x7b", "--scale", "16", "--granularity", "8", "--tokens", "1",
                         "--batch", "1", "--dtype", "bfloat16", "--quick")
    assert code == 0 and "differs from the loop" not in out + err
