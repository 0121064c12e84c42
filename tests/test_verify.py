"""verify: exact conversions verify exact, lossy ones and perturbed weights are caught and located,
mismatched models are refused, the CLI options and exit codes, and memory is one layer per model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesurgery.cli import main
from moesurgery.convert import convert
from moesurgery.errors import BadInputError, UsageError
from moesurgery.verify import TOLERANCE, verify
from tests.fixtures import FAMILIES, VOCAB_SIZE, _save_tokenizer
from tests.test_convert import EXACT, LOSSY, source

ROOT = Path(__file__).resolve().parents[1]
EXPERT_KEY = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
ATTN_KEY = "model.layers.1.self_attn.q_proj.weight"


# ------------------------------------------------------------------------------------------ helpers
def cli(capsys, *args) -> tuple[int, str, list[str]]:
    """Run the CLI in process: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def assert_one_error(err: list[str], *needles: str) -> None:
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err


def assert_exact(report: dict) -> None:
    assert report["verdict"] == "exact", report
    assert report["logits"]["rel_err"] < 1e-5
    assert report["logits"]["top1_agreement"] == 1.0
    assert report["logits"]["kl"] < 1e-8
    assert report["layers"] and all(l["rel_err"] < 1e-5 for l in report["layers"]), report["layers"]
    assert all(l["routing_agreement"] in (None, 1.0) for l in report["layers"]), report["layers"]
    assert report["untouched"]["changed"] == [] and report["untouched"]["identical"] > 0


def perturbed_copy(path: Path, dest: Path, key: str, scale: float = 0.1) -> Path:
    """A copy of a single-file checkpoint with noise added to tensor `key`."""
    shutil.copytree(path, dest)
    tensors = load_file(dest / "model.safetensors")
    t = tensors[key]
    gen = torch.Generator().manual_seed(7)
    tensors[key] = (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture
def exact_pair(checkpoint, tmp_path) -> tuple[Path, Path]:
    """mixtral and its exact qwen2_moe conversion."""
    ref = checkpoint("mixtral")
    convert(ref, tmp_path / "cand", "qwen2_moe")
    return ref, tmp_path / "cand"


@pytest.fixture
def lossy_pair(checkpoint, tmp_path) -> tuple[Path, Path]:
    """mixtral and its lossy glm4_moe conversion (sigmoid routing cannot express softmax)."""
    ref = checkpoint("mixtral")
    convert(ref, tmp_path / "cand", "glm4_moe", allow_lossy=True)
    return ref, tmp_path / "cand"


# ------------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("src,dst", EXACT, ids=[f"{a}-to-{b}" for a, b in EXACT])
def test_exact_conversion_verifies_exact(checkpoint, tmp_path, src, dst):
    path = source(checkpoint, src)
    convert(path, tmp_path / "out", dst)
    report = verify(path, tmp_path / "out")
    assert_exact(report)
    assert (report["reference_layout"], report["candidate_layout"]) == (src, dst)
    assert [l["index"] for l in report["layers"]] == list(range(len(report["layers"])))
    assert report["tolerance"] == TOLERANCE[torch.float32] and report["dtype"] == "float32"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_layout_verifies_exact(checkpoint, tmp_path, family):
    path = source(checkpoint, family)
    convert(path, tmp_path / "out", family)
    report = verify(path, tmp_path / "out", batch=1, seq_len=16)
    assert_exact(report)
    assert report["inputs"] == {"kind": "random tokens (seed 0)", "batch": 1, "seq_len": 16, "tokens_scored": 15}
    # same layout, same bytes: nothing differs at all
    assert report["logits"]["max_abs_err"] == 0 and all(l["max_abs_err"] == 0 for l in report["layers"])


def test_tied_embeddings_exact(checkpoint, tmp_path):
    path = checkpoint("llama", tie_word_embeddings=True)
    convert(path, tmp_path / "out", "mistral")
    assert_exact(verify(path, tmp_path / "out"))


# ------------------------------------------------------------------------------------------ lossy
@pytest.mark.parametrize("src,dst", LOSSY, ids=[f"{a}-to-{b}" for a, b in LOSSY])
def test_lossy_conversion_verifies_lossy(checkpoint, tmp_path, src, dst):
    path = source(checkpoint, src)
    convert(path, tmp_path / "out", dst, allow_lossy=True)
    report = verify(path, tmp_path / "out")
    assert report["verdict"] == "lossy"
    g = report["logits"]
    assert g["max_abs_err"] > 0 and g["rel_err"] > report["tolerance"] and g["kl"] > 0
    worst = report["layers"][report["worst_layer"]]
    assert worst["rel_err"] == max(l["rel_err"] for l in report["layers"]) > report["tolerance"]


def test_cli_expect_exact_on_lossy_exits_4(capsys, lossy_pair):
    ref, cand = lossy_pair
    code, out, err = cli(capsys, ref, cand, "--expect", "exact")
    assert code == 4
    assert_one_error(err, "expected exact", "lossy")
    assert "lossy" in out  # the report is still printed
    code, _, err = cli(capsys, ref, cand, "--expect", "lossy")
    assert code == 0 and err == []
    code, _, err = cli(capsys, ref, cand)
    assert code == 0 and err == []


def test_cli_expect_exact_on_exact_exits_0(capsys, exact_pair):
    code, out, err = cli(capsys, *exact_pair, "--expect", "exact")
    assert code == 0 and err == [] and "exact" in out


def test_cli_expect_exact_subprocess(lossy_pair):
    """The real entry point (`python -m moesurgery`): exit 4, one error line, nothing else on stderr."""
    ref, cand = lossy_pair
    proc = subprocess.run(
        [sys.executable, "-m", "moesurgery", "verify", str(ref), str(cand), "--expect", "exact", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 4, proc.stderr
    assert_one_error(proc.stderr.splitlines(), "expected exact")
    assert json.loads(proc.stdout)["verdict"] == "lossy"


# ------------------------------------------------------------------------------------------ perturbations
def test_perturbed_expert_is_located(checkpoint, tmp_path):
    ref = checkpoint("mixtral")
    cand = perturbed_copy(ref, tmp_path / "cand", EXPERT_KEY)
    clean = verify(ref, ref)
    report = verify(ref, cand)
    assert report["verdict"] == "lossy"
    layers = report["layers"]
    assert layers[0]["rel_err"] < 1e-6 and layers[0]["max_abs_err"] < 1e-6
    assert report["worst_layer"] == 1 and layers[1]["rel_err"] > report["tolerance"]
    assert layers[1]["routing_agreement"] == 1.0  # the router is untouched and sees the same input
    assert report["logits"]["rel_err"] > report["tolerance"] and report["logits"]["kl"] > 0
    # experts are not part of the untouched set: nothing reported changed
    assert report["untouched"] == clean["untouched"] and report["untouched"]["changed"] == []


def test_perturbed_attention_is_named(checkpoint, tmp_path):
    ref = checkpoint("mixtral")
    cand = perturbed_copy(ref, tmp_path / "cand", ATTN_KEY)
    clean = verify(ref, ref)
    report = verify(ref, cand)
    assert report["verdict"] == "lossy"
    assert report["untouched"]["changed"] == [ATTN_KEY]
    assert report["untouched"]["identical"] == clean["untouched"]["identical"] - 1
    # the blocks are fed the reference's hidden states: they agree; the logits do not
    assert all(l["rel_err"] < 1e-6 for l in report["layers"])
    assert report["logits"]["rel_err"] > report["tolerance"]


def test_perturbed_lm_head_is_named(checkpoint, tmp_path):
    ref = checkpoint("llama")
    cand = perturbed_copy(ref, tmp_path / "cand", "lm_head.weight")
    report = verify(ref, cand)
    assert report["verdict"] == "lossy" and report["untouched"]["changed"] == ["lm_head.weight"]


# ------------------------------------------------------------------------------------------ mismatched models
MISMATCHED = {
    "layers": (("llama", {"num_hidden_layers": 3}), ("llama", {}), "number of layers"),
    "vocab": (("llama", {"vocab_size": 256}), ("llama", {}), "vocabulary size"),
    "hidden": (("llama", {"hidden_size": 32}), ("llama", {}), "hidden size"),
    "gqa-vs-mla": (("llama", {}), ("deepseek_v2", {"num_hidden_layers": 2}), "attention kind"),
    "gqa-vs-mla-3-layers": (("llama", {}), ("deepseek_v2", {}), "not comparable"),
    "kv-heads": (("llama", {"num_key_value_heads": 4}), ("llama", {}), "attention heads"),
}


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_mismatched_models_refused(checkpoint, capsys, name):
    (fa, oa), (fb, ob), message = MISMATCHED[name]
    a, b = checkpoint(fa, **oa), checkpoint(fb, **ob)
    with pytest.raises(BadInputError, match=message):
        verify(a, b)
    code, out, err = cli(capsys, a, b)
    assert code == 3 and out == ""
    assert_one_error(err, "not comparable", message)


# ------------------------------------------------------------------------------------------ inputs
def test_text_gives_perplexity(capsys, tmp_path, exact_pair):
    words = " ".join(f"w{4 + (i * 7) % (VOCAB_SIZE - 4)}" for i in range(40))
    text = tmp_path / "text.txt"
    text.write_text(words)
    code, out, err = cli(capsys, *exact_pair, "--text", text, "--seq-len", 16, "--batch", 2, "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["inputs"]["kind"] == "text, tokenized with tokenizer.json (40 tokens)"
    assert (report["inputs"]["batch"], report["inputs"]["seq_len"], report["inputs"]["tokens_scored"]) == (2, 16, 30)
    p = report["perplexity"]
    assert math.isfinite(p["reference"]) and p["reference"] > 1
    assert p["candidate"] == pytest.approx(p["reference"], rel=1e-6)
    # human output mentions it too; by default the whole text is scored (one window of its 40 tokens)
    code, out, _ = cli(capsys, *exact_pair, "--text", text)
    assert code == 0 and "perplexity" in out and "39 scored" in out and "over 39 tokens" in out


def test_text_default_covers_the_text_in_windows(tmp_path, exact_pair, monkeypatch):
    """Regression (#14): --text scored 2 x 64 tokens whatever the text; now windows cover it up to a cap."""
    from moesurgery import verify as v

    words = " ".join(f"w{4 + (i * 7) % (VOCAB_SIZE - 4)}" for i in range(1000))
    monkeypatch.setattr(v, "TEXT_WINDOW", 128)
    report = verify(*exact_pair, text=words)
    assert (report["inputs"]["batch"], report["inputs"]["seq_len"]) == (7, 128)  # 1000 tokens: 7 whole windows
    monkeypatch.setattr(v, "TEXT_TOKENS_CAP", 300)
    report = verify(*exact_pair, text=words)
    assert report["inputs"]["batch"] == 2 and report["inputs"]["tokens_scored"] == 2 * 127


def test_text_perplexity_differs_when_lossy(tmp_path, lossy_pair):
    report = verify(*lossy_pair, text=" ".join(f"w{i}" for i in range(4, 60)))
    assert report["perplexity"]["candidate"] != report["perplexity"]["reference"]


def test_text_missing_or_too_short(capsys, tmp_path, exact_pair):
    code, _, err = cli(capsys, *exact_pair, "--text", tmp_path / "nope.txt")
    assert code == 3 and len(err) == 1
    (tmp_path / "one.txt").write_text("w5")
    code, _, err = cli(capsys, *exact_pair, "--text", tmp_path / "one.txt")
    assert code == 3
    assert_one_error(err, "fewer than 2 tokens")


def test_text_without_tokenizer_uses_bytes(checkpoint, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(checkpoint("llama"), ref)
    (ref / "tokenizer.json").unlink()
    report = verify(ref, ref, text="hello world, plain bytes")
    assert "utf-8 bytes" in report["inputs"]["kind"] and report["verdict"] == "exact"


def test_text_tokens_outside_vocab_are_refused(checkpoint, capsys, tmp_path):
    """Regression: ids from tokenizer.json were not checked against vocab_size (IndexError, exit 1)."""
    ref = tmp_path / "ref"
    shutil.copytree(checkpoint("llama"), ref)
    _save_tokenizer(ref, 300)  # a tokenizer larger than the model's 128-token vocabulary
    (tmp_path / "t.txt").write_text("w200 w5 w6 w7")
    code, _, err = cli(capsys, ref, ref, "--text", tmp_path / "t.txt")
    assert code == 3
    assert_one_error(err, "vocabulary")


def test_tokens(capsys, tmp_path, exact_pair):
    code, out, err = cli(capsys, *exact_pair, "--tokens", "1,2,3,4", "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["inputs"] == {"kind": "given token ids", "batch": 1, "seq_len": 4, "tokens_scored": 3}
    assert report["verdict"] == "exact"
    (tmp_path / "ids.txt").write_text("5 6\n7, 8 9\n")
    code, out, _ = cli(capsys, *exact_pair, "--tokens", tmp_path / "ids.txt", "--json")
    assert code == 0 and json.loads(out)["inputs"]["seq_len"] == 5


@pytest.mark.parametrize("spec,needle", [(f"1,2,{VOCAB_SIZE}", "outside the vocabulary"), ("1,-1", "outside the vocabulary"), ("1,x", "integer")])
def test_bad_tokens_exit_2(capsys, exact_pair, spec, needle):
    code, out, err = cli(capsys, *exact_pair, "--tokens", spec)
    assert code == 2 and out == ""
    assert_one_error(err, needle)


def test_empty_tokens_exit_2(capsys, exact_pair):
    """Regression: `--tokens ''` was falsy in the CLI and silently fell back to random tokens."""
    code, _, err = cli(capsys, *exact_pair, "--tokens", "")
    assert code == 2
    assert_one_error(err, "--tokens")


def test_library_usage_errors(exact_pair):
    with pytest.raises(UsageError):
        verify(*exact_pair, tokens=[])
    with pytest.raises(UsageError):
        verify(*exact_pair, tokens=[VOCAB_SIZE])
    with pytest.raises(UsageError):
        verify(*exact_pair, seq_len=1)
    with pytest.raises(UsageError):
        verify(*exact_pair, batch=0)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dtype", "int8"], "--dtype"),
        (["--expect", "maybe"], "--expect"),
        (["--seq-len", "1"], "--seq-len"),
        (["--batch", "0"], "--batch"),
    ],
)
def test_cli_usage_errors_exit_2(capsys, exact_pair, args, needle):
    code, out, err = cli(capsys, *exact_pair, *args)
    assert code == 2 and out == ""
    assert_one_error(err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_exit_2(capsys, exact_pair):
    code, _, err = cli(capsys, *exact_pair, "--device", "cuda")
    assert code == 2
    assert_one_error(err, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_exact_pair_is_exact(capsys, exact_pair, dtype):
    code, out, err = cli(capsys, *exact_pair, "--device", "cuda", "--dtype", dtype, "--expect", "exact", "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["verdict"] == "exact" and report["device"].startswith("cuda")
    assert report["logits"]["rel_err"] <= report["tolerance"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_sees_lossy(capsys, lossy_pair):
    code, out, _ = cli(capsys, *lossy_pair, "--device", "cuda", "--expect", "exact", "--json")
    assert code == 4 and json.loads(out)["verdict"] != "exact"


def test_missing_candidate_exit_3(capsys, tmp_path, exact_pair):
    code, _, err = cli(capsys, exact_pair[0], tmp_path / "missing")
    assert code == 3 and len(err) == 1 and err[0].startswith("error: ")


# ------------------------------------------------------------------------------------------ dtype
@pytest.mark.parametrize("src,dst", [("mixtral", "deepseek"), ("deepseek", "qwen2_moe"), ("llama", "qwen2")])
def test_bfloat16_exact_conversion_still_exact(capsys, checkpoint, tmp_path, src, dst):
    """bf16 rounding (e.g. DeepSeek v1's softmax in the model dtype) stays within the bf16 tolerance."""
    path = source(checkpoint, src)
    convert(path, tmp_path / "out", dst)
    code, out, err = cli(capsys, path, tmp_path / "out", "--dtype", "bfloat16", "--expect", "exact", "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["verdict"] == "exact"
    assert report["dtype"] == "bfloat16" and report["tolerance"] == TOLERANCE[torch.bfloat16]
    assert report["logits"]["rel_err"] <= report["tolerance"] and report["logits"]["top1_agreement"] > 0.9


def test_bfloat16_still_sees_lossy(lossy_pair):
    assert verify(*lossy_pair, dtype=torch.bfloat16)["verdict"] == "lossy"


def test_heads_not_multiple_of_kv_heads_is_bad_input(capsys, tmp_path):
    path = tmp_path / "odd"
    write_llama(path, layers=1, hidden=64, inter=128, vocab=VOCAB_SIZE, heads=3, kv_heads=2, head_dim=16)
    code, _, err = cli(capsys, path, path)
    assert code == 3
    assert_one_error(err, "num_key_value_heads")


# ------------------------------------------------------------------------------------------ json
def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_json_is_one_document(capsys, exact_pair):
    code, out, err = cli(capsys, *exact_pair, "--json", "--seq-len", 8, "--batch", 1)
    assert code == 0 and err == []
    report = json.loads(out, parse_constant=_no_constants)  # raises on any extra output
    assert out.lstrip().startswith("{") and out.rstrip().endswith("}")
    assert report["verdict"] == "exact"
    assert set(report["logits"]) >= {"max_abs_err", "rel_err", "top1_agreement", "kl"}
    assert all(isinstance(report["logits"][k], float) for k in ("max_abs_err", "rel_err", "top1_agreement", "kl"))
    assert len(report["layers"]) == 2
    for i, l in enumerate(report["layers"]):
        assert set(l) >= {"index", "max_abs_err", "rel_err"} and l["index"] == i
    assert isinstance(report["untouched"]["identical"], int) and report["untouched"]["changed"] == []


def test_json_stays_valid_when_a_reference_block_is_zero(capsys, checkpoint, tmp_path):
    """Regression: rel_err was inf for an all-zero reference block, and --json printed `Infinity`."""
    ref = tmp_path / "ref"
    shutil.copytree(checkpoint("llama"), ref)
    tensors = load_file(ref / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"].zero_()
    save_file(tensors, ref / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = cli(capsys, ref, checkpoint("llama"), "--json")
    assert code == 0
    report = json.loads(out, parse_constant=_no_constants)
    assert report["verdict"] == "lossy" and report["worst_layer"] == 1
    assert all(math.isfinite(l["rel_err"]) for l in report["layers"])


# ------------------------------------------------------------------------------------------ memory
MEM_LAYERS, MEM_HIDDEN, MEM_INTER, MEM_VOCAB, MEM_HEADS = 8, 1024, 4096, 256, 8


def write_llama(path: Path, *, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """A llama checkpoint with one fp32 shard per layer, written with safetensors only (no transformers).
    Returns the bytes of one decoder layer."""
    path.mkdir(parents=True)
    H, I, V, n = hidden, inter, vocab, layers + 1
    gen = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    weight_map, layer_bytes = {}, 0
    for i in range(n):
        p = f"model.layers.{i}."
        if i < layers:
            tensors = {p + "self_attn.q_proj.weight": w(heads * head_dim, H), p + "self_attn.o_proj.weight": w(H, heads * head_dim)}
            tensors |= {p + "self_attn.k_proj.weight": w(kv_heads * head_dim, H), p + "self_attn.v_proj.weight": w(kv_heads * head_dim, H)}
            tensors |= {p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I)}
            tensors |= {p + "input_layernorm.weight": torch.ones(H), p + "post_attention_layernorm.weight": torch.ones(H)}
            layer_bytes = sum(t.nbytes for t in tensors.values())
        else:
            tensors = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": torch.ones(H), "lm_head.weight": w(V, H)}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": V, "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))
    return layer_bytes


def write_big_llama(path: Path) -> int:
    """8 layers of ~67 MB (fp32, hidden 1024, intermediate 4096), vocabulary 256."""
    return write_llama(path, layers=MEM_LAYERS, hidden=MEM_HIDDEN, inter=MEM_INTER, vocab=MEM_VOCAB,
                       heads=MEM_HEADS, kv_heads=MEM_HEADS, head_dim=MEM_HIDDEN // MEM_HEADS)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from moesurgery.reader import CheckpointReader
    from moesurgery.verify import verify

    def peak():
        # VmHWM: the peak RSS of this process's own address space. Not ru_maxrss: Linux carries the
        # parent's peak over fork + exec into it, so under a big pytest process it hides everything.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    path = sys.argv[1]
    base = peak()
    report = verify(path, path, batch=1, seq_len=16)
    streamed = peak() - base
    # non-streaming baseline, measured after: every tensor of ONE checkpoint in hand (and touched)
    reader = CheckpointReader(path)
    held = {k: reader.get(k) for k in reader.keys()}
    total = 0
    for t in held.values():
        t.sum()  # touch every page (the reader may hand out file-backed tensors)
        total += t.nbytes
    whole = peak() - base
    print(json.dumps({"verdict": report["verdict"], "streamed": streamed, "whole": whole, "bytes": total}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units and page accounting: Linux")
def test_streaming_memory_is_bounded_by_layers(tmp_path):
    layer_bytes = write_big_llama(tmp_path / "big")
    model_bytes = layer_bytes * MEM_LAYERS
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True, env=env, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["verdict"] == "exact"
    bound = 3 * layer_bytes + 150_000_000
    assert r["streamed"] < bound, f"verify grew RSS by {r['streamed'] / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB (model {model_bytes / 1e6:.0f} MB)"
    # the bound is tight enough to tell: holding one whole model exceeds it
    assert r["bytes"] >= model_bytes and r["whole"] > bound, r


@pytest.mark.parametrize("tied", [False, True])
def test_big_tensors_are_read_once(monkeypatch, checkpoint, tmp_path, tied):
    """embed_tokens and lm_head: one read per model (they are the largest tensors of big-vocabulary models)."""
    from moesurgery.lazy import Lazy

    ref = checkpoint("llama", tie_word_embeddings=tied)
    convert(ref, tmp_path / "cand", "qwen2")
    reads: dict[str, int] = {}
    load = Lazy.load

    def counting(self):
        reads[self.origin] = reads.get(self.origin, 0) + 1
        return load(self)

    monkeypatch.setattr(Lazy, "load", counting)
    report = verify(ref, tmp_path / "cand", seq_len=8)
    assert report["verdict"] == "exact" and report["untouched"]["changed"] == []
    assert reads["model.embed_tokens.weight"] == 2  # reference + candidate
    assert reads.get("lm_head.weight", 0) == (0 if tied else 2)


def test_text_pydoc_is_the_builtin_heldout_text(capsys, exact_pair):
    code, out, err = cli(capsys, *exact_pair, "--text", "pydoc", "--seq-len", 16, "--json")
    assert code == 0 and err == []
    report = json.loads(out)
    assert report["inputs"]["kind"].startswith("text") and math.isfinite(report["perplexity"]["reference"])


def test_text_pydoc_without_pydoc_data_is_one_line(monkeypatch, capsys, exact_pair):
    import sys as _sys

    monkeypatch.setitem(_sys.modules, "pydoc_data.topics", None)  # import fails
    code, _, err = cli(capsys, *exact_pair, "--text", "pydoc")
    assert code == 3
    assert_one_error(err, "pydoc_data")
