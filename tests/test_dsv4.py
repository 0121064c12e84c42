"""DeepSeek-V4 (issue #11, part 1): read / write / inspect / convert / runtime / surgery.

Proof: tiny checkpoints made with transformers' DeepseekV4ForCausalLM, in both name forms (save_pretrained's
and DeepSeek's own); our runtime's logits equal transformers' (fp32) on prompts longer than the sliding
window and several compress windows, hash layers included, the indexer choosing (its top-k below the
compressed entries); decoding step by step equals the full forward; same-layout convert byte-identical in
the form read; the MoE block equals transformers' DeepseekV4MoE on the same inputs and token ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moesurgery.convert import convert
from moesurgery.errors import BadInputError
from moesurgery.inspection import inspect_model
from moesurgery.model_io import open_model
from moesurgery.operations import split_experts
from moesurgery.reader import CheckpointReader
from moesurgery.runtime import Runtime
from moesurgery.runtime.model import ffn_forward, load_ffn
from moesurgery.verify import verify
from tests.dsv4_fixtures import VOCAB, dsv4_logits, dsv4_model, make_dsv4

FORMS = ["saved", "hub"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4")
    made: dict = {}

    def build(form: str = "saved", **overrides) -> Path:
        key = (form, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_dsv4(root / "-".join([form, *map(str, overrides.values())]), form, **overrides)
        return made[key]

    return build


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(3))  # window 8, HCA /8, CSA /4, top-4


@pytest.mark.parametrize("form", FORMS)
def test_runtime_matches_transformers(v4, ids, form):
    path = v4(form)
    assert rel_err(Runtime(open_model(path).model).forward(ids), dsv4_logits(path, ids)) < 1e-5


def test_the_prompts_exercise_every_part(v4, ids):
    """The indexer chooses (its top-k below the compressed entries), the sinks and hash tables matter."""
    path = v4()
    base = Runtime(open_model(path).model).forward(ids)
    for change in ("indexer", "hash"):
        m = open_model(path).model
        if change == "indexer":
            m.arch.dsv4["index_topk"] = 1000
        else:
            r = m.layers[0].ffn.router
            r.hash_table = type(r.hash_table).of(r.hash_table.load().flip(0))
        assert rel_err(Runtime(m).forward(ids), base) > 1e-3, change


def test_decoding_step_by_step_equals_the_full_forward(v4, ids):
    """Exact in fp64 (the decode path computes what the full forward does); in fp32 within the rounding of other
    matmul shapes, which the hyper-connections amplify (transformers' own cached decode is ~1e-5 from its full forward)."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        rt = Runtime(open_model(v4()).model, dtype=dtype, resident=True)
        full = rt.forward(ids)
        caches: list = []
        steps = [rt.forward(ids[:, :13], caches)] + [rt.forward(ids[:, t : t + 1], caches) for t in range(13, ids.shape[1])]
        assert rel_err(torch.cat(steps, 1), full) < tol, dtype
        chunked: list = []  # several new tokens per step, across window boundaries
        cuts = [0, 5, 6, 9, 17, ids.shape[1]]
        parts = [rt.forward(ids[:, a:b], chunked) for a, b in zip(cuts, cuts[1:])]
        assert rel_err(torch.cat(parts, 1), full) < tol, dtype
    # the cache is bounded: keys of the sliding window, inputs since the last complete window's start, entries
    arch = rt.model.arch
    for i, c in enumerate(caches):
        seq = c["seq"][0]
        assert seq["len"] == ids.shape[1] and seq["kv"].shape[0] == min(arch.sliding_window, ids.shape[1])
        if "x" in seq:
            m = arch.dsv4["compress_rates"][arch.layer_types[i]]
            assert seq["x"].shape[0] < 2 * m and seq["entries"].shape[0] == ids.shape[1] // m


def test_moe_block_matches_transformers(v4):
    path = v4()
    hf, ours = dsv4_model(path), open_model(path).model
    g = torch.Generator().manual_seed(0)
    x, tok = torch.randn(1, 23, 64, generator=g), torch.randint(0, VOCAB, (1, 23), generator=g)
    for i in (0, 1):  # a hash layer and a learned one
        with torch.no_grad():
            want = hf.model.layers[i].mlp(x, input_ids=tok)
        assert rel_err(ffn_forward(x, load_ffn(ours.layers[i].ffn), ids=tok), want) < 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_same_layout_convert_is_byte_identical_in_the_form_read(v4, tmp_path, form):
    path = v4(form)
    assert convert(path, tmp_path / "out", "deepseek_v4")["exact"]
    a, b = CheckpointReader(path), CheckpointReader(tmp_path / "out")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.info(k).dtype == b.info(k).dtype and torch.equal(a.get(k), b.get(k)), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4" and cfg["mlp_layer_types"][0] == "hash_moe"


def test_inspect(v4):
    report = inspect_model(v4("hub"))
    assert report["model_type"] == "deepseek_v4" and report["num_moe_layers"] == 5
    assert "hyper-connection" in report["attention"]["kind"] or "hyper-connection" in json.dumps(report["attention"])
    assert any("deepseek form" in n for n in report["notes"])


def test_verify_says_exact_for_a_copy(v4, tmp_path):
    path = v4()
    convert(path, tmp_path / "copy", "deepseek_v4")
    report = verify(path, tmp_path / "copy", seq_len=37, batch=2)
    assert report["verdict"] == "exact" and report["logits"]["rel_err"] == 0


def test_finer_experts_refused_with_the_reason(v4, tmp_path):
    with pytest.raises(BadInputError, match="shared MLP has the experts' width"):
        split_experts(v4(), tmp_path / "out", granularity=2)
    assert not (tmp_path / "out").exists()


def test_other_layouts_refuse_its_attention(v4, tmp_path):
    with pytest.raises(BadInputError, match="attention cannot be converted"):
        convert(v4(), tmp_path / "out", "deepseek_v3", allow_lossy=True)


def test_hash_layer_without_table_refused(v4, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = v4()
    shutil.copytree(src, tmp_path / "bad")
    (shard,) = sorted((tmp_path / "bad").glob("*.safetensors"))
    state = {k: v for k, v in load_file(str(shard)).items() if not k.endswith("tid2eid")}
    save_file(state, str(shard))
    with pytest.raises(BadInputError, match="tid2eid is missing"):
        open_model(tmp_path / "bad")


# ------------------------------------------------------------------------------------ prune / merge
def _check_reduced(path: Path, out: Path, keep: int, ids):
    model = open_model(out).model
    for layer in model.layers:
        r = layer.ffn.router
        assert len(layer.ffn.experts) == keep and r.num_experts == keep
        if r.hash_table is not None:
            t = r.hash_table.load()
            assert int(t.max()) < keep and all(len(set(row)) == len(row) for row in t.tolist())  # a row never names one twice
    logits = dsv4_logits(out, ids)  # transformers loads and runs it
    assert torch.isfinite(logits).all()
    assert rel_err(Runtime(model).forward(ids), logits) < 1e-5


def test_prune_experts_remaps_the_hash_tables(v4, ids, tmp_path):
    from moesurgery.operations import prune_experts

    path = v4()
    report = prune_experts(path, tmp_path / "out", keep=3, calibration_text="hello world " * 200, calibration_tokens=256)
    assert report["verdict"] == "lossy"
    _check_reduced(path, tmp_path / "out", 3, ids)


def test_merge_experts_remaps_the_hash_tables(v4, ids, tmp_path):
    from moesurgery.operations import merge_experts

    path = v4()
    merge_experts(path, tmp_path / "out", into=3, calibration_text="hello world " * 200, calibration_tokens=256)
    _check_reduced(path, tmp_path / "out", 3, ids)


def test_remap_hash_substitutes_and_renumbers():
    from moesurgery.lazy import Lazy
    from moesurgery.surgery.prune import remap_hash

    table = Lazy.of(torch.tensor([[0, 1], [1, 2], [3, 0]]))
    out = remap_hash(table, {0: [0], 2: [2], 3: [3]}, {1: [0, 2]}).load()  # 1 removed: 0 where the row lacks it, else 2
    assert out.tolist() == [[0, 1], [0, 1], [2, 0]]  # old 0, 2, 3 -> new 0, 1, 2


# ------------------------------------------------------------------------------------ FP8 / FP4 releases
@pytest.fixture(scope="module")
def v4q(tmp_path_factory):
    from tests.dsv4_fixtures import make_dsv4_quantized

    return make_dsv4_quantized(tmp_path_factory.mktemp("dsv4q") / "fp")


def _stored(path: Path) -> dict:
    r = CheckpointReader(path)
    return {k: (r.info(k).dtype, r.stored(k).load().contiguous().view(-1).view(torch.uint8)) for k in r.stored_keys()}


def test_fp8_fp4_release_read_as_transformers_dequantizes_it(v4q, ids):
    opened = open_model(v4q)
    assert opened.reader.fp4 and opened.reader.scales  # FP4 experts and FP8 blocks were paired with their E8M0 scales
    assert rel_err(Runtime(opened.model).forward(ids), dsv4_logits(v4q, ids)) < 1e-5


def test_fp8_fp4_same_layout_convert_is_byte_identical(v4q, tmp_path):
    report = convert(v4q, tmp_path / "out", "deepseek_v4")
    assert any("written as block-scaled FP8 like the source" in n for n in report["notes"])
    a, b = _stored(v4q), _stored(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0" and cfg["expert_dtype"] == "fp4"


def test_pruned_fp8_fp4_release_stays_quantized(v4q, ids, tmp_path):
    from moesurgery.operations import prune_experts

    report = prune_experts(v4q, tmp_path / "out", keep=3, calibration_text="hello world " * 200, calibration_tokens=256)
    assert any("written as block-scaled FP8 like the source" in n for n in report["notes"]), report["notes"]
    kept = report["kept"]["1"]
    a, b = _stored(v4q), _stored(tmp_path / "out")
    for new, old in enumerate(kept):  # whole experts: the same FP4 bytes and scales under their new numbers
        for w in ("w1", "w2", "w3"):
            for part in ("weight", "scale"):
                assert torch.equal(b[f"layers.1.ffn.experts.{new}.{w}.{part}"][1], a[f"layers.1.ffn.experts.{old}.{w}.{part}"][1])
    assert torch.isfinite(dsv4_logits(tmp_path / "out", ids)).all()


def test_bench_runs_it(v4, capsys):
    """bench: the hash layer's block (token ids drawn), prefill, decode (short prompts: no window compressed yet)."""
    from moesurgery.cli import main

    assert main(["bench", str(v4()), "--quick", "--json", "--tokens", "1,16", "--batch", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"][0]["layout"] == "deepseek_v4" and report["models"][0]["decode"]


def test_perplexity_equals_transformers(v4):
    """The perplexity verify reports (our runtime) is transformers' on the same tokens."""
    import torch.nn.functional as F

    path = v4("hub")

    def ppl(logits):
        return float(torch.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))

    from moesurgery.verify import make_inputs

    text = "the quick brown fox jumps over the lazy dog, " * 4
    tokens, _ = make_inputs(open_model(path), text, None, 1, 37, 0)
    ours = verify(path, path, text=text, batch=1, seq_len=37)["perplexity"]["reference"]
    ids = tokens.reshape(1, -1)
    assert ours == pytest.approx(ppl(dsv4_logits(path, ids)), rel=1e-5)


def with_bad_hash_entry(source: Path, path: Path, expert: int) -> Path:
    """A copy of `source` whose first hash table sends token 3 to `expert`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    (shard,) = sorted(path.glob("*.safetensors"))
    state = load_file(str(shard))
    key = next(k for k in state if k.endswith("tid2eid"))
    state[key][3, 0] = expert
    save_file(state, str(shard))
    return path


def test_hash_table_naming_a_missing_expert_refused(v4, tmp_path):
    bad = with_bad_hash_entry(v4(), tmp_path / "bad", 99)
    with pytest.raises(BadInputError, match="routed to expert 99, but the layer has 4 experts"):
        Runtime(open_model(bad).model).forward(torch.zeros(1, 4, dtype=torch.long))


def test_hash_table_naming_a_missing_expert_refused_by_convert(v4, tmp_path):
    """convert copied a table routing tokens to expert 10000 (only the runtime checked it)."""
    bad = with_bad_hash_entry(v4(), tmp_path / "bad", 10_000)
    with pytest.raises(BadInputError, match="routed to expert 10000, but the layer has 4 experts"):
        convert(bad, tmp_path / "out", "deepseek_v4")  # checked where the table is read: here by the writer
    assert not (tmp_path / "out").exists()


def test_attention_tensors_that_do_not_fit_the_config_are_bad_input(v4, tmp_path):
    """head_dim one more than the attention tensors hold crashed the runtime (exit 1, a reshape error); every
    DeepSeek-V4 attention tensor is now checked against the config when the model is read, naming the tensor as stored."""
    import shutil

    shutil.copytree(v4(), tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["head_dim"] += 1
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match=r"model\.layers\.0\.attn\.wq_b\.weight: shape \[128, 16\], expected \[132, 16\] from config\.json"):
        open_model(tmp_path / "bad")
