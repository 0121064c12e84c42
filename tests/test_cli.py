"""The `moesurgery` command line, run in-process through `main(argv)` (plus a subprocess smoke test).

Every failure must be: the documented exit code, exactly one `error: ...` line on stderr, no traceback,
nothing on stdout, and nothing left at the output path (nor a temporary sibling next to it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesurgery import __version__, cli
from moesurgery.cli import main
from moesurgery.reader import INDEX_NAME, SINGLE_NAME
from moesurgery.tiny import TINY

COMMANDS = ["inspect", "convert", "split-experts", "upcycle", "verify", "bench"]
MIX = TINY["mixtral"]
H, I, E, K, L = MIX["hidden_size"], MIX["intermediate_size"], MIX["num_local_experts"], MIX["num_experts_per_tok"], MIX["num_hidden_layers"]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _env(tiny_cache, monkeypatch):
    monkeypatch.setenv("MOESURGERY_CACHE", str(tiny_cache))
    monkeypatch.setitem(cli.state, "debug", False)


@pytest.fixture
def tiny_mixtral_dir(tiny_cache) -> Path:
    return tiny_cache / "tiny" / "mixtral-v1"


@pytest.fixture
def src(tmp_path, tiny_mixtral_dir) -> Path:
    """A writable local copy of tiny:mixtral, with tokenizer / generation config / chat template."""
    path = tmp_path / "src"
    shutil.copytree(tiny_mixtral_dir, path)
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel"}}')
    (path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "moesurgery-tmp" in p.name or "moesurgery-old" in p.name)


def assert_error(result, code: int, output: Path | None = None, contains: tuple[str, ...] = ()) -> str:
    got, out, err = result
    assert got == code, (got, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), err
    assert "Traceback" not in out + err
    assert out == "" or json.loads(out) == {"error": lines[0][len("error: "):], "exit_code": code}  # --json: the error as JSON
    for text in contains:
        assert text in lines[0], (text, lines[0])
    if output is not None:
        assert not output.exists(), f"{output} left behind"
        if output.parent.exists():
            assert leftovers(output.parent) == []
    return lines[0]


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensor(path: Path, key: str, value: torch.Tensor) -> None:
    tensors = load_file(str(path / SINGLE_NAME))
    assert key in tensors
    tensors[key] = value
    save_file(tensors, str(path / SINGLE_NAME))


# ------------------------------------------------------------------------------------ help / version
def test_help_lists_all_commands(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == ""
    for name in COMMANDS:
        assert name in out, name


def test_convert_help_lists_options(capsys):
    code, out, err = run(capsys, "convert", "--help")
    assert code == 0
    for opt in ("--to", "--allow-lossy", "--max-shard-size", "--overwrite", "--dry-run", "--json"):
        assert opt in out, opt


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert (code, out, err) == (0, f"moesurgery {__version__}\n", "")


def test_no_arguments_prints_help_without_empty_error_line(capsys):
    code, out, err = run(capsys)
    assert "convert" in out + err
    assert not any(line.strip() == "error:" for line in err.splitlines()), err


def test_subprocess_smoke(tiny_cache):
    env = {**os.environ, "MOESURGERY_CACHE": str(tiny_cache)}
    r = subprocess.run([sys.executable, "-m", "moesurgery", "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"moesurgery {__version__}\n", "")


def test_console_script_installed():
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "moesurgery"]
    assert ep.value == "moesurgery.entry:entry"
    assert (Path(sys.executable).parent / "moesurgery").exists()


def test_entry_exits_with_main_code(capsys, tmp_path, monkeypatch):
    """What the console script runs: main() over sys.argv, then os._exit with its code (atexit skipped)."""
    import signal

    from moesurgery import entry

    def fake_exit(code):
        raise SystemExit(code)

    monkeypatch.setattr(entry.os, "_exit", fake_exit)
    monkeypatch.setattr(sys, "argv", ["moesurgery", "convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "mixtral"])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        try:
            cli.entry()
        finally:
            signal.signal(signal.SIGINT, handlers[0])
            signal.signal(signal.SIGTERM, handlers[1])
    assert e.value.code == 3
    cap = capsys.readouterr()
    assert cap.out == "" and len(cap.err.strip().splitlines()) == 1 and cap.err.startswith("error: ")


# ------------------------------------------------------------------------------------ inspect
LAYER_KEYS = {"index", "kind", "num_experts", "top_k", "expert_width", "shared_width"}


def test_inspect_json(capsys, tiny_mixtral_dir):
    code, out, err = run(capsys, "inspect", "tiny:mixtral", "--json")
    assert code == 0 and err == ""
    assert out.startswith("{") and out.endswith("}\n")
    report = json.loads(out)  # exactly one document: json.loads refuses trailing data
    for key in ("model_type", "num_layers", "params_total", "params_active", "layers"):
        assert key in report, key
    assert report["model_type"] == "mixtral"
    assert report["num_layers"] == L
    assert [layer["index"] for layer in report["layers"]] == list(range(L))
    for layer in report["layers"]:
        assert LAYER_KEYS <= set(layer)
        assert (layer["kind"], layer["num_experts"], layer["top_k"], layer["expert_width"], layer["shared_width"]) == ("moe", E, K, I, 0)
    total = sum(t.numel() for t in load_file(str(tiny_mixtral_dir / SINGLE_NAME)).values())
    assert report["params_total"] == total
    assert report["params_active"] == total - L * (E - K) * 3 * I * H


def test_inspect_json_dense(capsys):
    code, out, err = run(capsys, "inspect", "tiny:llama", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["model_type"] == "llama"
    assert report["params_total"] == report["params_active"]
    assert all(layer["kind"] == "dense" and layer["num_experts"] == 0 for layer in report["layers"])


def test_inspect_human(capsys):
    code, out, err = run(capsys, "inspect", "tiny:mixtral")
    assert code == 0 and err == ""
    assert "mixtral" in out and "FFN per layer" in out


def test_inspect_missing_source(capsys, tmp_path):
    assert_error(run(capsys, "inspect", tmp_path / "nope", "--json"), 3, contains=("nope",))


def test_inspect_unknown_tiny(capsys):
    assert_error(run(capsys, "inspect", "tiny:gpt5", "--json"), 3, contains=("tiny:gpt5",))


# ------------------------------------------------------------------------------------ convert: success
def test_convert_json(capsys, tmp_path, tiny_mixtral_dir):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen2_moe", "--json")
    assert code == 0, err
    assert err == ""
    report = json.loads(stdout)
    assert report["verdict"] == "exact" and report["exact"] is True and report["lossy_reasons"] == []
    assert (report["source_layout"], report["target_layout"], report["dry_run"]) == ("mixtral", "qwen2_moe", False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "moesurgery.json"]
    assert leftovers(tmp_path) == []
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    written = load_file(str(out / "model.safetensors"))
    assert report["tensors"] == len(written)
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in written.values())
    assert report["shards"] == [{"file": "model.safetensors", "bytes": report["bytes"], "tensors": len(written)}]
    source = load_file(str(tiny_mixtral_dir / SINGLE_NAME))
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.self_attn.q_proj.weight"):
        assert torch.equal(written[key], source[key]), key
    meta = json.loads((out / "moesurgery.json").read_text())
    assert meta["moesurgery_source"] == "tiny:mixtral" and meta["moesurgery_version"] == __version__
    assert meta["shards"] == 1
    # the output is itself a readable checkpoint
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0
    back = json.loads(stdout)
    assert back["model_type"] == "qwen2_moe" and back["num_layers"] == L
    assert all(layer["num_experts"] == E and layer["top_k"] == K for layer in back["layers"])


def test_convert_human(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen2_moe")
    assert code == 0 and err == ""
    assert "mixtral -> qwen2_moe" in stdout and "exact" in stdout and "wrote" in stdout
    assert (out / "model.safetensors").exists()


def test_convert_provenance_records_the_command(capsys, tmp_path):
    out = tmp_path / "out"
    assert run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen2_moe")[0] == 0
    meta = json.loads((out / "moesurgery.json").read_text())
    assert meta["moesurgery_command"] == f"moesurgery convert tiny:mixtral {out} --to qwen2_moe"


def test_convert_relative_output(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", "rel-out", "--to", "qwen2_moe", "--json")
    assert code == 0, err
    assert json.loads(stdout)["output"] == "rel-out"
    assert (tmp_path / "rel-out" / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_convert_dry_run_writes_nothing(capsys, tmp_path):
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen2_moe", "--dry-run", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["dry_run"] is True and report["verdict"] == "exact"
    assert report["tensors"] > 0 and report["shards"]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen2_moe", "--dry-run")
    assert code == 0 and "would write" in stdout
    assert not out.exists()


def test_convert_sharded(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen2_moe", "--max-shard-size", "1MB", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    n = len(report["shards"])
    assert n > 1
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [s["file"] for s in report["shards"]] == files
    assert not (out / SINGLE_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    keys = {}
    for name in files:
        shard = load_file(str(out / name))
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 1_000_000 or len(shard) == 1
        keys.update({k: name for k in shard})
    assert index["weight_map"] == keys
    assert index["metadata"]["total_size"] == report["bytes"]
    assert json.loads((out / "moesurgery.json").read_text())["shards"] == n
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0 and json.loads(stdout)["shards"] == n


def test_convert_local_source_untouched_and_side_files_copied(capsys, tmp_path, src):
    before = tree_hash(src)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", src, out, "--to", "qwen2_moe", "--max-shard-size", "500KB", "--json")
    assert code == 0, err
    # a failing conversion does not touch the source either
    assert_error(run(capsys, "convert", src, tmp_path / "out2", "--to", "glm4_moe"), 3, tmp_path / "out2")
    assert tree_hash(src) == before
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    # and converting a tiny: source leaves the cached checkpoint as it was
    cached = Path(os.environ["MOESURGERY_CACHE"]) / "tiny" / "mixtral-v1"
    before = tree_hash(cached)
    assert run(capsys, "convert", "tiny:mixtral", tmp_path / "out3", "--to", "mixtral")[0] == 0
    assert tree_hash(cached) == before


def test_convert_overwrite_replaces(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral", "--overwrite", "--json")
    assert code == 0, err
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_convert_lossy_allowed(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "glm4_moe", "--allow-lossy", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["verdict"] == "lossy" and report["exact"] is False and report["lossy_reasons"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm4_moe"


# ------------------------------------------------------------------------------------ convert: errors
def test_missing_source_dir(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", tmp_path / "missing", out, "--to", "mixtral", "--json"), 3, out, ("missing",))


def test_source_is_a_file(capsys, tmp_path, src):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src / "config.json", out, "--to", "mixtral"), 3, out)


def test_source_without_config(capsys, tmp_path, src):
    (src / "config.json").unlink()
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "mixtral"), 3, out, ("config.json",))


def test_source_with_broken_config(capsys, tmp_path, src):
    (src / "config.json").write_text("{not json")
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "mixtral"), 3, out, ("config.json",))


def test_pickle_only_source(capsys, tmp_path):
    source = tmp_path / "pickled"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(MIX))
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", source, out, "--to", "mixtral"), 3, out, ("pickle",))


def test_unsupported_model_type(capsys, tmp_path, src):
    edit_config(src, model_type="gpt2")
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "mixtral", "--json"), 3, out, ("gpt2",))


def test_unknown_target_layout(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "gpt2"), 3, out, ("gpt2",))


def test_lossy_refused_without_allow_lossy(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "glm4_moe", "--json"), 3, out, ("--allow-lossy",))


def test_incompatible_attention(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "qwen3_moe"), 3, out, ("qwen3_moe",))


def test_dense_source_to_moe_layout(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:llama", out, "--to", "mixtral"), 3, out, ("llama",))


def test_output_exists_without_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    code, stdout, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral")
    assert_error((code, stdout, err), 2, contains=("--overwrite",))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_output_is_a_file(capsys, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    assert_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral", "--overwrite"), 2)
    assert out.read_text() == "a file"


@pytest.mark.parametrize("where", ["inside", "same"])
def test_output_inside_source(capsys, tmp_path, src, where):
    before = tree_hash(src)
    out = src / "out" if where == "inside" else src
    result = run(capsys, "convert", src, out, "--to", "qwen2_moe", "--overwrite")
    assert_error(result, 2, out if where == "inside" else None, ("source",))
    assert tree_hash(src) == before
    assert leftovers(src) == [] and leftovers(tmp_path) == []


def test_output_inside_source_relative(capsys, src, monkeypatch):
    monkeypatch.chdir(src)
    assert_error(run(capsys, "convert", ".", "sub", "--to", "qwen2_moe"), 2, src / "sub", ("source",))


def test_missing_to_option(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:mixtral", out), 2, out, ("--to",))


def test_missing_arguments(capsys, tmp_path):
    assert_error(run(capsys, "convert", "tiny:mixtral", "--to", "mixtral"), 2)
    assert_error(run(capsys, "inspect"), 2)


def test_unknown_option(capsys, tmp_path):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral", "--frobnicate"), 2, out, ("--frobnicate",))


def test_unknown_command(capsys):
    assert_error(run(capsys, "transmogrify"), 2, contains=("transmogrify",))


@pytest.mark.parametrize("size", ["abc", "0", "5XB", "1.2.3GB"])
def test_bad_max_shard_size(capsys, tmp_path, size):
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral", "--max-shard-size", size), 2, out, ("--max-shard-size",))


def test_config_claims_more_layers(capsys, tmp_path, src):
    edit_config(src, num_hidden_layers=L + 1)
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "qwen2_moe"), 3, out, (f"layer {L}",))
    assert_error(run(capsys, "inspect", src, "--json"), 3)


def test_config_missing_field(capsys, tmp_path, src):
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_local_experts"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "qwen2_moe"), 3, out, ("num_local_experts",))


MOE = "model.layers.1.block_sparse_moe."


@pytest.mark.parametrize(
    "key, shape",
    [
        ("model.embed_tokens.weight", (MIX["vocab_size"] - 1, H)),
        (MOE + "gate.weight", (E - 1, H)),
        (MOE + "experts.3.w2.weight", (H, I + 1)),
        (MOE + "experts.3.w3.weight", (I - 1, H)),
        pytest.param(MOE + "experts.3.w1.weight", (I + 1, H)),
        pytest.param("lm_head.weight", (MIX["vocab_size"] - 1, H)),
        pytest.param("model.norm.weight", (H - 1,)),
        pytest.param("model.layers.1.self_attn.q_proj.weight", (H - 4, H)),
    ],
)
def test_tensor_with_wrong_shape(capsys, tmp_path, src, key, shape):
    edit_tensor(src, key, torch.zeros(shape))
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "qwen2_moe"), 3, out, (key,))


def test_missing_expert_tensor(capsys, tmp_path, src):
    tensors = load_file(str(src / SINGLE_NAME))
    del tensors[MOE + "experts.5.w2.weight"]
    save_file(tensors, str(src / SINGLE_NAME))
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "qwen2_moe"), 3, out, (MOE + "experts.5.w2.weight",))


@pytest.fixture
def sharded_src(capsys, tmp_path) -> Path:
    path = tmp_path / "sharded"
    assert run(capsys, "convert", "tiny:mixtral", path, "--to", "mixtral", "--max-shard-size", "1MB")[0] == 0
    assert (path / INDEX_NAME).exists()
    return path


def test_sharded_source_converts(capsys, tmp_path, sharded_src):
    before = tree_hash(sharded_src)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "convert", sharded_src, out, "--to", "qwen2_moe", "--json")
    assert code == 0, err
    assert json.loads(stdout)["verdict"] == "exact"
    assert tree_hash(sharded_src) == before


def test_index_names_missing_shard(capsys, tmp_path, sharded_src):
    shard = "model-00002-of-00004.safetensors"
    (sharded_src / shard).unlink()
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", sharded_src, out, "--to", "qwen2_moe"), 3, out, (shard,))


def test_corrupt_shard_header(capsys, tmp_path, sharded_src):
    shard = "model-00003-of-00004.safetensors"
    (sharded_src / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", sharded_src, out, "--to", "qwen2_moe"), 3, out, (shard,))


def test_truncated_shard_data(capsys, tmp_path, src):
    """The header is intact but the data is cut short: the error surfaces while writing; nothing is left."""
    data = (src / SINGLE_NAME).read_bytes()
    (src / SINGLE_NAME).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "qwen2_moe"), 3, out, (SINGLE_NAME,))


def test_malformed_header_entry_exit_code(capsys, tmp_path, src):
    raw = json.dumps({"model.embed_tokens.weight": [1, 2]}).encode()
    raw += b" " * (-len(raw) % 8)
    (src / SINGLE_NAME).write_bytes(len(raw).to_bytes(8, "little") + raw)
    out = tmp_path / "out"
    assert_error(run(capsys, "convert", src, out, "--to", "qwen2_moe"), 3, out, (SINGLE_NAME,))


# ------------------------------------------------------------------------------------ --debug
def test_debug_shows_traceback(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "--debug", "convert", tmp_path / "missing", out, "--to", "mixtral")
    assert code == 3
    assert "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists()
    # the next run without --debug is back to one line
    assert_error(run(capsys, "convert", tmp_path / "missing", out, "--to", "mixtral"), 3, out)


def test_debug_on_success_is_quiet(capsys, tmp_path):
    code, stdout, err = run(capsys, "--debug", "inspect", "tiny:mixtral", "--json")
    assert code == 0 and err == ""
    json.loads(stdout)
