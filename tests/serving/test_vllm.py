"""vLLM (CPU) serves what moesurgery writes: for every layout vLLM supports that we write, through
convert and every surgery, vLLM's prompt log-probabilities equal transformers' on the same checkpoint
within 1e-4 and its 16-token greedy continuations are identical; for exact surgeries both equal the
source's (transformers on the source).

Tiny shapes vLLM-CPU runs: head size >= 32 (its CPU attention has no 16), MLA on the MHA path. Block-FP8
does not run on this CPU (vLLM's FP8 kernels need AMX): that case skips with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.serving.conftest import run_vllm

PROMPTS = [[1, 17, 33, 4, 90, 12, 71, 5], [1, 5, 9, 60, 61, 2, 100, 44, 3, 7, 8, 99, 120], [1] + [(i * 37) % 127 + 1 for i in range(23)]]
TOL = 1e-4
GQA = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)  # vLLM-CPU attention: head size >= 32
MLA = dict(num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, kv_lora_rank=16)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


def source(root: Path, family: str, **overrides) -> Path:
    from tests.fixtures import make_checkpoint

    shapes = MLA if family in ("deepseek_v2", "deepseek_v3") else GQA
    path = root / ("src-" + family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items())))
    if not (path / "config.json").exists():
        make_checkpoint(family, path, **{**shapes, **overrides})
    return path


def lineage_source(root: Path, family: str, **overrides) -> Path:
    from tests.lineage_fixtures import make_lineage

    path = root / ("lin-" + family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items())))
    if not (path / "config.json").exists():
        make_lineage(family, path, **{**GQA, **overrides})
    return path


@torch.no_grad()
def run_transformers(path: Path, prompts=PROMPTS, max_tokens: int = 16, dtype=torch.float32) -> dict:
    """transformers (eager): log-prob of every prompt token after the first, greedy continuation (no cache)."""
    from tests.lineage_fixtures import _causal_lm_class  # mistral4 is not in AutoModelForCausalLM's map

    cls = _causal_lm_class(json.loads((Path(path) / "config.json").read_text()).get("model_type"))
    model = cls.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()
    logprobs, greedy = [], []
    for p in prompts:
        ids = torch.tensor([p])
        lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        logprobs.append([float(lp[i - 1, p[i]]) for i in range(1, len(p))])
        seq = list(p)
        for _ in range(max_tokens):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        greedy.append(seq[len(p):])
    return {"prompt_logprobs": logprobs, "greedy": greedy}


def max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for ra, rb in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for x, y in zip(ra, rb))


def check_served(out: Path, src: Path | None, exact: bool) -> None:
    hf = run_transformers(out)
    served = run_vllm(out, PROMPTS)
    assert max_diff(served, hf) <= TOL, f"vLLM vs transformers on {out.name}: {max_diff(served, hf):.2e}"
    assert served["greedy"] == hf["greedy"]
    if exact:
        ref = run_transformers(src)
        assert max_diff(hf, ref) <= TOL and hf["greedy"] == ref["greedy"], "the exact surgery changed the function"


# ------------------------------------------------------------------------------------ cases
def _convert(root, family, to):
    from moesurgery.convert import convert

    src = source(root, family)
    out = root / f"convert-{family}-{to}"
    assert convert(src, out, to, overwrite=True)["exact"]
    return src, out, True


def _finer(root, family, **overrides):
    from moesurgery.operations import split_experts

    src = source(root, family, **overrides)
    out = root / f"finer-{family}"
    assert split_experts(src, out, granularity=2, overwrite=True)["verdict"] == "exact"
    return src, out, True


def _upcycle_dense(root, family, to, shared):
    from moesurgery.operations import upcycle

    src = source(root, family)
    out = root / f"upcycle-{family}-{to}"
    report = upcycle(src, out, granularity=2, experts=8, top_k=4, shared=shared, to=to, overwrite=True)
    assert report["verdict"] == "exact"
    return src, out, True


def _default_main_job(root):
    """The README's main job (Mixtral -> fine-grained experts, default target): exact and served."""
    from moesurgery.operations import upcycle

    src = source(root, "mixtral")
    out = root / "main-job"
    report = upcycle(src, out, granularity=4, overwrite=True)
    assert report["target_layout"] == "qwen2_moe" and report["verdict"] == "exact"
    return src, out, True


def _mixtral_shared(root):
    from moesurgery.operations import upcycle

    src = source(root, "mixtral")
    out = root / "mixtral-shared"
    upcycle(src, out, granularity=4, shared=1, to="qwen2_moe", allow_lossy=True, overwrite=True)  # measured, not exact
    return src, out, False


def _moefy(root):
    from moesurgery.operations import split_experts

    src = source(root, "llama")
    out = root / "moefy"
    split_experts(src, out, experts=8, top_k=4, shared=0, allow_lossy=True, overwrite=True)  # training-free: lossy
    return src, out, False


def _moefy_tied(root):
    """A tied dense model (SmolLM2's) split into glm4_moe with shared experts, as the SmolLM2 recipes do: vLLM's
    Glm4Moe model never ties lm_head, so the head must be written out (before: all-zero logits in vLLM)."""
    from moesurgery.operations import split_experts

    src = source(root, "llama", tie_word_embeddings=True)
    out = root / "moefy-tied"
    split_experts(src, out, experts=6, top_k=3, shared=2, first_k_dense=1, to="glm4_moe", allow_lossy=True, overwrite=True)
    return src, out, False


def _reduced(root, family, how):
    """prune-experts / merge-experts outputs (lossy: vLLM vs transformers on the output)."""
    from moesurgery.operations import merge_experts, prune_experts

    src = source(root, family)
    out = root / f"{how}-{family}"
    if how == "prune":
        prune_experts(src, out, keep=2, calibration_tokens=256, overwrite=True)
    else:
        merge_experts(src, out, into=2, calibration_tokens=256, overwrite=True)
    return src, out, False


def _donors(root):
    """upcycle --donor (lossy: distinct donors): the base's attention, each donor's FFN a virtual group, shared from the base."""
    from moesurgery.operations import upcycle_donors
    from tests.fixtures import make_checkpoint

    base = source(root, "llama")
    donors = []
    for seed in (1, 2):
        d = root / f"donor-llama-{seed}"
        if not (d / "config.json").exists():
            make_checkpoint("llama", d, seed=seed, **GQA)
        donors.append(d)
    out = root / "donors-llama"
    upcycle_donors(base, out, donors=donors, prompts=["w5 w6 w7 w8", "w20 w30 w40"], granularity=2, top_k=2, shared=2, overwrite=True)
    return base, out, False


def _gpt_oss_finer(root):
    from moesurgery.operations import split_experts
    from tests.gpt_oss_fixtures import make_gpt_oss

    src = root / "src-gpt_oss"
    if not (src / "config.json").exists():
        make_gpt_oss(src, **GQA)
    out = root / "finer-gpt_oss"
    assert split_experts(src, out, granularity=2, overwrite=True)["verdict"] == "exact"
    return src, out, True


def _llama4_prune(root):
    """Llama 4 in vLLM-CPU: top-1 only (its input-side routing weight), chunks a multiple of its 128-token KV
    blocks, and the attention temperature left at the released floor_scale (8192): with a tiny floor_scale vLLM's
    NoPE temperature differs from transformers' (measured 0.07 in log-probs on 24-token prompts)."""
    from moesurgery.operations import prune_experts
    from tests.llama4_fixtures import make_llama4

    src = root / "src-llama4"
    if not (src / "config.json").exists():
        make_llama4("llama4_text", src, **GQA, attention_chunk_size=128, floor_scale=8192)
    out = root / "prune-llama4"
    prune_experts(src, out, keep=6, calibration_tokens=256, overwrite=True)
    return src, out, False


def _lineage_finer(root, family, **overrides):
    from moesurgery.operations import split_experts

    src = lineage_source(root, family, **overrides)
    out = root / f"finer-{family}"
    assert split_experts(src, out, granularity=2, overwrite=True)["verdict"] == "exact"
    return src, out, True


CASES = {
    "convert-mixtral-qwen2_moe": lambda r: _convert(r, "mixtral", "qwen2_moe"),
    "finer-mixtral": lambda r: _finer(r, "mixtral"),
    "finer-qwen2_moe": lambda r: _finer(r, "qwen2_moe"),
    "finer-qwen3_moe": lambda r: _finer(r, "qwen3_moe"),
    "finer-olmoe": lambda r: _finer(r, "olmoe"),
    "finer-deepseek_v2": lambda r: _finer(r, "deepseek_v2"),
    "finer-deepseek_v3": lambda r: _finer(r, "deepseek_v3", n_group=1, topk_group=1),
    "finer-glm4_moe": lambda r: _finer(r, "glm4_moe", n_group=1, topk_group=1),
    "upcycle-llama-glm4_moe": lambda r: _upcycle_dense(r, "llama", "glm4_moe", 2),
    "upcycle-llama-qwen2_moe": lambda r: _upcycle_dense(r, "llama", "qwen2_moe", 2),
    "upcycle-qwen3-qwen3_moe": lambda r: _upcycle_dense(r, "qwen3", "qwen3_moe", 0),
    "main-job-default-target": _default_main_job,
    "mixtral-shared-extraction": _mixtral_shared,
    "training-free-split": _moefy,
    "training-free-split-tied-glm4_moe": _moefy_tied,
    "finer-hy_v3": lambda r: _lineage_finer(r, "hy_v3", attention_bias=False),  # vLLM's hy_v3 has no attention biases
    "prune-experts-mixtral": lambda r: _reduced(r, "mixtral", "prune"),
    "merge-experts-qwen2_moe": lambda r: _reduced(r, "qwen2_moe", "merge"),
    "upcycle-donors-llama": _donors,
    "finer-gpt_oss": _gpt_oss_finer,
    "prune-experts-llama4": _llama4_prune,
}
# Not in the tier (BENCHMARKS.md "serving"): vLLM-CPU 0.32's MoE router asserts softmax for minimax_m2's
# sigmoid + bias routing, and ignores ERNIE-4.5's selection bias (a zero bias matches); DeepSeek-V3.2 / GLM-5
# sparse attention and Mistral Small 4 have no CPU path; dots1 and solar_open are not in its registry; Qwen3-Next
# runs in bf16 only (its own test below); Qwen3.5's module needs torchvision (CUDA-only in the registry); vLLM-CPU 0.32
# ships no DeepSeek-V4 model (its deepseek_v4 code is GPU-only); Mixtral in Mistral's format: see the Mistral test below.


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_serves_it_as_transformers_computes_it(root, case):
    src, out, exact = CASES[case](root)
    check_served(out, src, exact)


@pytest.mark.parametrize("kind", ["mistral", "large3"])
def test_vllm_serves_mistral_format_outputs(root, kind):
    """Outputs in Mistral's format (a dense Mistral converted from transformers' checkpoint: q/k rows in Mistral's
    pair order; Large 3's finer experts): vLLM's `mistral` load format (its own reader of params.json and the
    native names) computes what transformers computes on the source model. (Mixtral in Mistral's format does not
    load in vLLM 0.32: its params.json reader maps `moe` only when there are shared experts.)"""
    from moesurgery.convert import convert
    from moesurgery.operations import split_experts
    from tests.mistral_native_fixtures import make_native

    from tests.lineage_fixtures import YARN_L4

    # vLLM's DeepSeek yarn table holds original_max_position_embeddings x factor positions: 4 x 64 (query scaling from 4)
    shapes = GQA if kind == "mistral" else dict(MLA, rope_parameters=dict(YARN_L4, factor=64.0))
    native, hf = make_native(kind, root / "mistral-format", **shapes)
    out = root / f"native-{kind}"
    if kind == "mistral":
        assert convert(hf, out, "mistral", fmt="native", overwrite=True)["exact"]
    else:
        assert split_experts(native, out, granularity=2, overwrite=True)["verdict"] == "exact"
    assert (out / "params.json").is_file() and not (out / "config.json").exists()
    served, ref = run_vllm(out, PROMPTS), run_transformers(hf)
    assert max_diff(served, ref) <= TOL, f"vLLM (Mistral's format) vs transformers on the source: {max_diff(served, ref):.2e}"
    assert served["greedy"] == ref["greedy"]


def test_block_fp8_in_vllm_cpu(root):
    """vLLM's CPU block-FP8 kernels need AMX (Sapphire Rapids or newer) and 128-blocks; elsewhere FP8 outputs
    are checked in transformers only (tests/test_fp8.py)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "amx_tile" not in cpuinfo:
        pytest.skip("vLLM-CPU runs block-FP8 only on AMX CPUs (this one has none): FP8 outputs are checked in transformers")
    pytest.skip("an AMX CPU: FP8 serving check not written yet (needs 128 x 128 blocks, so a larger tiny model)")


def test_vllm_serves_gated_deltanet_in_bf16(root):
    """Qwen3-Next finer experts: vLLM-CPU runs Gated DeltaNet in bf16 only (and head dims of 128), so vLLM's
    bf16 log-probs are held to transformers' fp32 ones within the bf16 rounding band, which is measured on the same
    checkpoint: no farther than transformers' own bf16 run is (x1.5). Qwen3.5 is not servable here: vLLM's
    qwen3_5 module imports torchvision, which the registry ships only as a CUDA build."""
    from moesurgery.operations import split_experts
    from tests.hybrid_fixtures import make_hybrid

    src = root / "src-qwen3_next"
    if not (src / "config.json").exists():
        make_hybrid("qwen3_next", src, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=2)
    out = root / "finer-qwen3_next"
    assert split_experts(src, out, granularity=2, overwrite=True)["verdict"] == "exact"
    fp32, bf16 = run_transformers(out, max_tokens=0), run_transformers(out, max_tokens=0, dtype=torch.bfloat16)
    served = run_vllm(out, PROMPTS, max_tokens=1, dtype="bfloat16")
    band = max_diff(bf16, fp32)
    assert max_diff(served, fp32) <= 1.5 * band, f"vLLM bf16 vs transformers fp32 {max_diff(served, fp32):.3f}, bf16 band {band:.3f}"
    assert max_diff(run_transformers(src, max_tokens=0), fp32) <= TOL  # and the split is exact
