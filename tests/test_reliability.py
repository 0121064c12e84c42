"""Regression tests for the fault matrix of issue #14: signals, partial outputs, configs that disagree
with the checkpoint, index paths, environment errors, symlinks, unvalidated values, leftovers,
permissions, JSON errors, NaN naming, start-up time and stale GGUF configs.

Each test names the class of fault it makes impossible, not only the instance that was found.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesurgery import cli
from moesurgery.cli import main
from moesurgery.reader import INDEX_NAME, SINGLE_NAME

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tiny_cache) -> Path:
    return tiny_cache


@pytest.fixture(autouse=True)
def _env(cache, monkeypatch):
    monkeypatch.setenv("MOESURGERY_CACHE", str(cache))
    monkeypatch.setitem(cli.state, "debug", False)


@pytest.fixture
def mixtral(cache, tmp_path) -> Path:
    path = tmp_path / "src"
    shutil.copytree(cache / "tiny" / "mixtral-v1", path)
    return path


@pytest.fixture
def llama(cache, tmp_path) -> Path:
    path = tmp_path / "dense"
    shutil.copytree(cache / "tiny" / "llama-v1", path)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_error(result, code: int, *contains: str) -> str:
    got, out, err = result
    assert got == code, (got, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    for text in contains:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------ 1. signals
SCRIPT = """
import os, signal, sys
sys.argv = ["moesurgery"] + {argv!r}
import moesurgery.writer as writer
original = writer.write_shard
def write_shard(*a, **k):
    os.kill(os.getpid(), signal.{sig})  # arrives while the output is being written
    return original(*a, **k)
writer.write_shard = write_shard
import moesurgery.runtime.model as rt
load_layer = rt.load_layer
def slow_layer(*a, **k):
    os.kill(os.getpid(), signal.{sig})  # arrives while verify / bench run the model
    return load_layer(*a, **k)
rt.load_layer = slow_layer
import moesurgery.verify as v
v.load_ffn = lambda *a, **k: (os.kill(os.getpid(), signal.{sig}), rt.load_ffn(*a, **k))[1]
from moesurgery.entry import entry
entry()
"""


def _run_script(code: str, cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOESURGERY_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("argv", [
    ["convert", "tiny:mixtral", "OUT", "--to", "mixtral"],
    ["split-experts", "tiny:mixtral", "OUT", "--granularity", "2"],
    ["verify", "tiny:mixtral", "tiny:mixtral", "--expect", "exact"],
    ["bench", "tiny:mixtral", "--quick", "--tokens", "4", "--batch", "1"],
])
def test_interrupt_exits_with_one_line_and_cleans_up(cache, tmp_path, argv, sig, code):
    """Ctrl-C exited 0 in silence (typer turned it into a returned 130 that main ignored): an
    interrupted `verify --expect exact` passed a CI check. Now 130 (SIGTERM: 143), one line, no
    traceback, no temporary directory left."""
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    proc = _run_script(SCRIPT.format(argv=argv, sig=sig), cache, tmp_path)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists() and siblings(tmp_path) == []


def test_interrupt_during_start_up_is_one_line(cache, tmp_path):
    """A Ctrl-C while the CLI's modules import (before main) used to print Python's traceback."""
    code = textwrap.dedent("""
        import os, signal, sys
        sys.argv = ["moesurgery", "--help"]
        class Hook:
            def find_spec(self, name, path=None, target=None):
                if name == "moesurgery.cli":
                    os.kill(os.getpid(), signal.SIGINT)
                return None
        sys.meta_path.insert(0, Hook())
        from moesurgery.entry import entry
        entry()
    """)
    proc = _run_script(code, cache, tmp_path)
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (130, "error: interrupted", "")


def test_exit_skips_atexit_handlers(cache, tmp_path):
    """Interpreter shutdown (atexit, finalizers) is where a late Ctrl-C printed 'Exception ignored';
    the console script flushes and leaves with os._exit, so nothing runs there."""
    code = textwrap.dedent("""
        import atexit, os, signal, sys
        sys.argv = ["moesurgery", "--version"]
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), print("atexit ran")))
        from moesurgery.entry import entry
        entry()
    """)
    proc = _run_script(code, cache, tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("moesurgery ") and "atexit ran" not in proc.stdout
    assert proc.stderr == ""


# ------------------------------------------------------------------------------------ 2. nothing before the check
def test_failing_quick_check_leaves_no_output(capsys, tmp_path, monkeypatch):
    """The quick check ran after the rename: a check that crashed left OUTPUT/ complete-looking."""
    import moesurgery.operations as ops

    def boom(*a, **k):
        raise RuntimeError("check crashed")

    monkeypatch.setattr(ops, "quick_check", boom)
    out = tmp_path / "nested" / "out"
    code, _, err = run(capsys, "split-experts", "tiny:mixtral", out, "--granularity", "2")
    assert code == 1 and "check crashed" in err
    assert not out.exists() and not out.parent.exists()  # the parent this run made is gone too


def test_check_runs_before_commit_and_output_has_report(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "split-experts", "tiny:mixtral", out, "--granularity", "2", "--json")
    assert code == 0 and json.loads(stdout)["verdict"] == "exact"
    assert (out / "moesurgery.json").exists() and siblings(tmp_path) == []


# ------------------------------------------------------------------------------------ 3. configs vs checkpoint
@pytest.mark.parametrize("top_k", [0, -1, 9])
@pytest.mark.parametrize("command", ["inspect", "convert", "verify", "bench"])
def test_top_k_out_of_range_is_refused_everywhere(capsys, tmp_path, mixtral, top_k, command):
    """top-k > experts, 0 or negative: inspect/convert called it exact, verify/bench crashed."""
    edit_config(mixtral, num_experts_per_tok=top_k)
    args = {"inspect": [mixtral], "convert": [mixtral, tmp_path / "o", "--to", "mixtral"], "verify": [mixtral, mixtral],
            "bench": [mixtral, "--quick", "--tokens", "4", "--batch", "1"]}[command]
    one_error(run(capsys, command, *args), 3, "top-k")


def test_fewer_layers_in_config_than_checkpoint_is_an_error(capsys, tmp_path, mixtral):
    """num_hidden_layers smaller than the layers present dropped layers 2-3 as 'multi-token-prediction'."""
    edit_config(mixtral, num_hidden_layers=2)
    one_error(run(capsys, "inspect", mixtral), 3, "layer 2", "num_hidden_layers = 2")
    one_error(run(capsys, "split-experts", mixtral, tmp_path / "o", "--granularity", "2"), 3, "layer 2")
    assert not (tmp_path / "o").exists()


def test_integer_weight_is_refused(capsys, tmp_path, mixtral):
    """An expert weight stored as int32 (no quantized form declared) was read as a weight by every command."""
    state = load_file(mixtral / SINGLE_NAME)
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    state[key] = state[key].to(torch.int32)
    save_file(state, mixtral / SINGLE_NAME, metadata={"format": "pt"})
    for command in (["inspect", mixtral], ["convert", mixtral, tmp_path / "o", "--to", "mixtral"], ["verify", mixtral, mixtral]):
        one_error(run(capsys, *command), 3, key, "dtype int32", "floating point")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family,field,value,message", [
    ("qwen2", "layer_types", lambda cfg: cfg["layer_types"][:-1], "layer_types lists"),  # transformers refuses the config
    ("qwen2_moe", "mlp_only_layers", lambda cfg: [99], "mlp_only_layers must list layer indices below"),
    ("qwen2_moe", "mlp_only_layers", lambda cfg: ["0"], "mlp_only_layers must list layer indices below"),
    ("deepseek_v3", "routed_scaling_factor", lambda cfg: -1.0, "routed scaling factor must be positive"),
    ("deepseek_v3", "routed_scaling_factor", lambda cfg: 0, "routed scaling factor must be positive"),
])
def test_config_values_that_cannot_hold_are_refused(capsys, tmp_path, checkpoint, family, field, value, message):
    src = tmp_path / "src"
    shutil.copytree(checkpoint(family), src)
    cfg = json.loads((src / "config.json").read_text())
    edit_config(src, **{field: value(cfg)})
    capsys.readouterr()  # the fixture's build
    for command in (["inspect", src], ["convert", src, tmp_path / "o", "--to", family]):
        one_error(run(capsys, *command), 3, field.split("_")[0], message)
    assert not (tmp_path / "o").exists()


def test_decoder_layer_past_num_hidden_layers_is_not_taken_for_mtp(capsys, tmp_path, checkpoint):
    """DeepSeek-V3's num_nextn_predict_layers = 1 made a decoder layer past a shortened num_hidden_layers pass as the
    multi-token-prediction layer (accepted by every command; a pruned output kept its old experts)."""
    src = tmp_path / "src"
    shutil.copytree(checkpoint("deepseek_v3"), src)
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.get("num_nextn_predict_layers", 1) == 1
    edit_config(src, num_hidden_layers=cfg["num_hidden_layers"] - 1)
    last = cfg["num_hidden_layers"] - 1
    capsys.readouterr()  # the fixture's build
    for command in (["inspect", src], ["convert", src, tmp_path / "o", "--to", "deepseek_v3"], ["prune-experts", src, tmp_path / "o", "--keep", "3"]):
        one_error(run(capsys, *command), 3, f"layer {last}", "no multi-token-prediction layer")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field,value", [("num_hidden_layers", "four"), ("hidden_size", 64.5), ("num_local_experts", True),
                                         ("rope_theta", "big"), ("num_experts_per_tok", [2])])
def test_non_integer_field_names_the_field(capsys, mixtral, field, value):
    """A non-integer field gave Python's ValueError text ('invalid literal for int()')."""
    edit_config(mixtral, **{field: value})
    line = one_error(run(capsys, "inspect", mixtral), 3, field)
    assert "invalid literal" not in line


def _overlap(path: Path) -> None:
    """Rewrite model.safetensors' header so two tensors share bytes."""
    raw = (path / SINGLE_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    a, b = sorted(keys, key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    if header[a]["data_offsets"][1] - header[a]["data_offsets"][0] == size and header[a]["shape"] == header[b]["shape"]:
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
    else:  # shift b onto a's bytes, keeping its size
        start = header[a]["data_offsets"][0]
        header[b]["data_offsets"] = [start, start + size]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    (path / SINGLE_NAME).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


@pytest.mark.parametrize("command", ["inspect", "convert", "verify"])
def test_overlapping_tensors_refused_by_every_command(capsys, tmp_path, mixtral, command):
    _overlap(mixtral)
    args = {"inspect": [mixtral], "convert": [mixtral, tmp_path / "o", "--to", "mixtral"], "verify": [mixtral, mixtral]}[command]
    one_error(run(capsys, command, *args), 3, "overlap")


# ------------------------------------------------------------------------------------ 4. index paths
def _sharded(path: Path, name: str) -> None:
    """Index whose one shard is called `name`."""
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {k: name for k in load_file(str(path / SINGLE_NAME))}}))


@pytest.mark.parametrize("name", ["../pipe.safetensors", "/dev/zero", "sub/model.safetensors", "..", ""])
def test_index_shard_names_must_be_plain_names(capsys, tmp_path, mixtral, name):
    """'../pipe.safetensors' (a FIFO) hung forever, /dev/zero was opened: names are checked before any open."""
    if name == "../pipe.safetensors":
        os.mkfifo(tmp_path / "pipe.safetensors")
    _sharded(mixtral, name)
    one_error(run(capsys, "inspect", mixtral), 3, "not a file name inside the checkpoint")


def test_fifo_shard_inside_the_checkpoint_is_refused(capsys, mixtral):
    os.mkfifo(mixtral / "pipe.safetensors")
    _sharded(mixtral, "pipe.safetensors")
    one_error(run(capsys, "inspect", mixtral), 3, "not a regular file")


def test_symlinked_shard_to_a_file_is_fine(capsys, mixtral):
    """The Hub cache stores shards as links to blobs: links to regular files stay readable."""
    _sharded(mixtral, "shard.safetensors")
    (mixtral / SINGLE_NAME).rename(mixtral / "blob")
    (mixtral / "shard.safetensors").symlink_to(mixtral / "blob")
    code, _, err = run(capsys, "inspect", mixtral)
    assert code == 0, err


# ------------------------------------------------------------------------------------ 5. environment errors
def test_full_disk_is_exit_5_naming_the_output_and_cleans_parents(capsys, tmp_path, monkeypatch):
    import moesurgery.writer as writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_shard", full)
    out = tmp_path / "a" / "b" / "out"
    line = one_error(run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral"), 5, str(out), "no space left")
    assert "moesurgery-tmp" not in line
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_permission_and_read_only_are_exit_5(capsys, tmp_path, monkeypatch, err):
    import moesurgery.writer as writer

    def refuse(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(writer, "write_shard", refuse)
    one_error(run(capsys, "convert", "tiny:mixtral", tmp_path / "out", "--to", "mixtral"), 5, str(tmp_path / "out"))


def test_unwritable_cache_is_exit_5(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MOESURGERY_CACHE", str(blocker / "cache"))
    one_error(run(capsys, "inspect", "tiny:llama"), 5, str(blocker))


# ------------------------------------------------------------------------------------ 6. symlinked outputs
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dangling", [False, True])
def test_symlinked_output_refused_before_work(capsys, tmp_path, overwrite, dangling, monkeypatch):
    """--overwrite onto a symlink left .NAME.moesurgery-old and broke later runs; a dangling link did all
    the work and then failed. Refused up front, the link and its target untouched."""
    import moesurgery.operations as ops

    target = tmp_path / "target"
    if not dangling:
        target.mkdir()
        (target / "keep").write_text("x")
    link = tmp_path / "out"
    link.symlink_to(target)
    monkeypatch.setattr(ops, "finer_experts", lambda *a: pytest.fail("work started"))
    args = ["split-experts", "tiny:mixtral", link, "--granularity", "2"] + (["--overwrite"] if overwrite else [])
    one_error(run(capsys, *args), 2, "symbolic link")
    assert link.is_symlink() and (dangling or (target / "keep").exists())
    assert [p for p in siblings(tmp_path) if "moesurgery" in p] == []


# ------------------------------------------------------------------------------------ 7. unvalidated values
@pytest.mark.parametrize("args,message", [
    (["upcycle", "tiny:llama", "OUT", "-g", "2", "-n", "4", "-k", "2", "--reinit-fraction", "2"], "--reinit-fraction"),
    (["upcycle", "tiny:llama", "OUT", "-g", "2", "-n", "4", "-k", "2", "--router-noise", "-1"], "--router-noise"),
    (["split-experts", "tiny:llama", "OUT", "-n", "4", "-k", "2", "--calibration", "pydoc", "--calibration-tokens", "0"], "--calibration-tokens"),
    (["verify", "tiny:llama", "tiny:llama", "--seq-len", "1000000"], "max_position_embeddings"),
    (["verify", "tiny:llama", "tiny:llama", "--batch", "100000000", "--seq-len", "64"], "GB"),
    (["verify", "tiny:llama", "tiny:llama", "--text", "pydoc", "--tokens", "1,2"], "not both"),
    (["bench", "tiny:mixtral", "-m", "0"], "--granularity"),
])
def test_values_are_validated_before_work(capsys, tmp_path, args, message):
    out = tmp_path / "out"
    one_error(run(capsys, *[str(out) if a == "OUT" else a for a in args]), 2, message)
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("granularity", '"two"'), ("seed", '"abc"'), ("top_k", "2.5"), ("shared", "true")])
def test_recipe_values_of_the_wrong_type(capsys, tmp_path, option, value):
    """Recipe values of the wrong type crashed with exit 1 (or were used as they came)."""
    options = {"granularity": "2", "experts": "4", "top_k": "2", option: value}
    recipe = tmp_path / "r.toml"
    recipe.write_text('command = "upcycle"\n[options]\n' + "".join(f"{k} = {v}\n" for k, v in options.items()))
    one_error(run(capsys, "upcycle", "tiny:llama", tmp_path / "out", "--recipe", recipe), 2, option)


def test_recipe_for_another_model_is_refused(capsys, tmp_path):
    """A recipe written for Llama-3.1-8B was applied to any model without a word."""
    one_error(run(capsys, "upcycle", "tiny:llama", tmp_path / "out", "--recipe", "llama-3.1-8b-deepseekmoe"), 2, "hidden_size = 4096")


# ------------------------------------------------------------------------------------ 8. leftovers
def test_stale_temporaries_of_dead_runs_are_removed(capsys, tmp_path):
    """kill -9 left .NAME.*.moesurgery-tmp siblings nothing cleaned."""
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".out.abc123.moesurgery-tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (stale / ".moesurgery-owner").write_text(f"{socket.gethostname()} {dead.pid}\n")
    old = tmp_path / ".out.moesurgery-old"
    old.mkdir()
    code, _, err = run(capsys, "convert", "tiny:mixtral", out, "--to", "mixtral")
    assert code == 0, err
    assert siblings(tmp_path) == []


def test_a_live_run_on_the_same_output_is_named(capsys, tmp_path):
    live = tmp_path / ".out.xyz.moesurgery-tmp"
    live.mkdir()
    (live / ".moesurgery-owner").write_text(f"{socket.gethostname()} {os.getpid()}\n")
    one_error(run(capsys, "convert", "tiny:mixtral", tmp_path / "out", "--to", "mixtral"), 2, "another moesurgery run", str(os.getpid()))
    assert live.exists()


# ------------------------------------------------------------------------------------ 9. permissions, JSON errors, NaN
def test_output_directory_follows_the_umask(capsys, tmp_path):
    """Outputs were created 0700 (mkdtemp): other users could not read the model."""
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "convert", "tiny:mixtral", tmp_path / "out", "--to", "mixtral")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_json_errors_are_a_json_document(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", tmp_path / "nope", "--json")
    assert code == 3 and json.loads(out) == {"error": err.strip()[len("error: "):], "exit_code": 3}


def _poison(path: Path, key: str) -> None:
    tensors = load_file(str(path / SINGLE_NAME))
    t = tensors[key].clone()
    t.view(-1)[0] = float("nan")
    tensors[key] = t
    save_file(tensors, str(path / SINGLE_NAME), metadata={"format": "pt"})


def test_nan_weights_are_named_by_the_quick_check(capsys, tmp_path, mixtral):
    key = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    _poison(mixtral, key)
    code, out, err = run(capsys, "split-experts", mixtral, tmp_path / "out", "--granularity", "2", "--json")
    assert code == 0, err
    check = json.loads(out)["check"]
    assert key in check["nonfinite"]
    assert check["verdict"] == "exact"  # NaN where both sides hold it: the same function


def test_identical_nan_checkpoints_verify_exact_and_name_the_tensor(capsys, mixtral):
    key = "model.layers.1.block_sparse_moe.experts.0.w2.weight"
    _poison(mixtral, key)
    code, out, err = run(capsys, "verify", mixtral, mixtral, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["verdict"] == "exact" and key in report["nonfinite"]["reference"]
    assert any(key in n for n in report["notes"])


# ------------------------------------------------------------------------------------ 14. start-up time
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["convert", "--help"], ["convert"], ["nope"]])
def test_help_version_and_usage_errors_do_not_import_torch(argv):
    """--help took 3 s: it imported torch. These paths never do now."""
    code = f"import sys; from moesurgery.cli import main; main({argv!r}); print('torch' in sys.modules, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stderr.strip().splitlines()[-1] == "False", proc.stderr


# ------------------------------------------------------------------------------------ 15. stale GGUF config
def test_gguf_config_over_float_weights_is_read_as_unquantized(capsys, tmp_path, llama):
    edit_config(llama, quantization_config={"quant_method": "gguf"})
    code, out, err = run(capsys, "inspect", llama, "--json")
    assert code == 0, err
    assert any("gguf" in n for n in json.loads(out)["notes"])
    code, out, err = run(capsys, "upcycle", llama, tmp_path / "out", "-g", "2", "-n", "4", "-k", "2", "--json", "--to", "qwen2_moe")
    assert code == 0, err
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert any("gguf" in n for n in json.loads(out)["notes"])


def test_gguf_config_over_quantized_tensors_is_refused(capsys, llama):
    edit_config(llama, quantization_config={"quant_method": "gguf"})
    tensors = load_file(str(llama / SINGLE_NAME))
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(tensors["model.layers.0.mlp.gate_proj.weight"].shape, dtype=torch.uint8)
    save_file(tensors, str(llama / SINGLE_NAME))
    code, _, err = run(capsys, "inspect", llama)
    assert code == 3 and "Traceback" not in err


# ------------------------------------------------------------------------------------ 11. defaults
def test_split_defaults_are_the_best_measured_settings(capsys, tmp_path):
    """With --calibration the default was kmeans + centroid although coactivation + fitted measured best."""
    code, out, err = run(capsys, "split-experts", "tiny:llama", tmp_path / "a", "-n", "8", "-k", "4", "--calibration", "pydoc",
                         "--calibration-tokens", "256", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["method"], report["router"]) == ("coactivation", "fitted")
    code, out, err = run(capsys, "split-experts", "tiny:llama", tmp_path / "b", "-n", "8", "-k", "4", "--json", "--dry-run")
    assert code == 0, err
    assert (json.loads(out)["method"], json.loads(out)["router"]) == ("kmeans", "centroid")
