"""The fault matrix: every test fixture family x config / tensor / file faults x commands, run in-process.

    python tools/fault_matrix.py [FAMILIES|all] [COMMANDS] [FAULTS] > matrix.log    # one JSON line per run, then PROBLEMS n

FAMILIES, COMMANDS (inspect, convert, verify, prune, split, bench) and FAULTS are comma-separated (default: all families,
inspect,convert,verify,prune, every fault). A run is flagged when it crashes (exit 1 or an exception), prints a
traceback or more than one error line, leaves OUTPUT behind after failing, or accepts (exit 0) a fault that breaks the
checkpoint. Some accepted faults are by design: a field the family does not use (head_dim under MLA, n_group under
DeepSeek-V2's greedy routing), NaN in a weight no checked token reaches, a hash table `inspect` does not read. Each
class of fault it found has a regression test (tests/test_reliability.py and the family's test module)."""
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moesurgery.cli import main  # noqa: E402

ROOT = Path(tempfile.mkdtemp(prefix="faults-", dir="/tmp"))


def build(family: str) -> Path:
    """The family's tiny checkpoint (built once under ROOT/src)."""
    from tests.fixtures import FAMILIES, make_checkpoint
    from tests.hybrid_fixtures import HYBRID, make_hybrid
    from tests.lineage_fixtures import LINEAGE, make_int4, make_lineage

    p = ROOT / "src" / family
    if (p / "config.json").exists():
        return p
    if family in LINEAGE:
        make_lineage(family, p)
    elif family in HYBRID:
        make_hybrid(family, p)
    elif family == "gpt_oss":
        from tests.gpt_oss_fixtures import make_gpt_oss
        make_gpt_oss(p)
    elif family == "gpt_oss-mxfp4":
        from tests.gpt_oss_fixtures import make_gpt_oss_mxfp4
        make_gpt_oss_mxfp4(p)
    elif family.startswith("llama4"):
        from tests.llama4_fixtures import make_llama4
        make_llama4(family, p)
    elif family == "deepseek_v4":
        from tests.dsv4_fixtures import make_dsv4
        make_dsv4(p)
    elif family == "deepseek_v4-q":
        from tests.dsv4_fixtures import make_dsv4_quantized
        make_dsv4_quantized(p)
    elif family == "kimi_k2-int4":
        make_int4(build("kimi_k2"), p)
    elif family in FAMILIES:
        make_checkpoint(family, p)
    else:
        raise ValueError(f"unknown family {family!r}")
    return p


TOPK = ("num_experts_per_tok", "moe_k", "top_k", "experts_per_token")
COUNT = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")


def levels(cfg):
    out = [cfg]
    for k in ("text_config", "language_config"):
        if isinstance(cfg.get(k), dict):
            out.append(cfg[k])
    return out


def find(cfg, names):
    for lv in reversed(levels(cfg)):
        for n in names:
            if n in lv and isinstance(lv[n], int) and not isinstance(lv[n], bool):
                return lv, n
    return None, None


def edit_cfg(p, fn):
    c = json.loads((p / "config.json").read_text())
    r = fn(c)
    if r is False:
        return False
    (p / "config.json").write_text(json.dumps(c))


def shards(p):
    return sorted(p.glob("*.safetensors"))


def edit_tensors(p, fn):
    """fn(dict of first shard that has an expert tensor) -> changed dict, or False; index updated."""
    for s in shards(p):
        t = load_file(s)
        if any("expert" in k for k in t):
            new = fn(dict(t))
            if new is False:
                return False
            save_file(new, s, metadata={"format": "pt"})
            idx = p / "model.safetensors.index.json"
            if idx.exists():
                j = json.loads(idx.read_text())
                wm = j["weight_map"]
                for k in list(wm):
                    if wm[k] == s.name and k not in new:
                        del wm[k]
                for k in new:
                    wm.setdefault(k, s.name)
                idx.write_text(json.dumps(j))
            return
    return False


def first_expert_key(t):
    ks = [k for k in t if "expert" in k and "shared" not in k and t[k].is_floating_point() and t[k].dim() >= 2]
    return ks[0] if ks else None


def m_topk(v):
    def f(c):
        lv, n = find(c, TOPK)
        if lv is None:
            return False
        if v == "big":
            lv2, n2 = find(c, COUNT)
            if lv2 is None:
                return False
            lv[n] = lv2[n2] + 1
        else:
            lv[n] = v
    return f


def m_layers(c):
    for lv in reversed(levels(c)):
        if "num_hidden_layers" in lv:
            lv["num_hidden_layers"] -= 1
            if isinstance(lv.get("layer_types"), list):
                lv["layer_types"] = lv["layer_types"][:-1]
            return
    return False


def m_field(v):
    def f(c):
        for lv in reversed(levels(c)):
            if "hidden_size" in lv:
                lv["hidden_size"] = v
                return
        return False
    return f


def m_drop_field(c):
    for lv in reversed(levels(c)):
        if "hidden_size" in lv:
            del lv["hidden_size"]
            return
    return False


def t_extra(t):
    t["model.layers.0.mlp.surprise.weight"] = torch.zeros(4, 4)
    return t


def t_missing(t):
    k = first_expert_key(t)
    if k is None:
        return False
    del t[k]
    return t


def t_nan(t):
    k = first_expert_key(t)
    if k is None:
        return False
    x = t[k].clone()
    x.view(-1)[3] = float("nan")
    t[k] = x
    return t


def t_shape(t):
    k = first_expert_key(t)
    if k is None:
        return False
    t[k] = t[k][..., :-1].contiguous()
    return t


def m_set(field, fn):
    def f(c):
        for lv in reversed(levels(c)):
            if field in lv and lv[field] is not None:
                v = fn(lv[field], lv)
                if v is None:
                    return False
                lv[field] = v
                return
        return False
    return f


def count_of(lv):
    for n in COUNT:
        if isinstance(lv.get(n), int):
            return lv[n]
    return 8


def t_drop_suffix(sufs):
    def f(t):
        ks = [k for k in t if k.endswith(sufs)]
        if not ks:
            return False
        del t[ks[0]]
        return t
    return f


def t_hash_range(t):
    ks = [k for k in t if k.endswith("tid2eid")]
    if not ks:
        return False
    x = t[ks[0]].clone()
    x.view(-1)[0] = 10**4
    t[ks[0]] = x
    return t


def t_bias_shape(t):
    ks = [k for k in t if k.endswith("e_score_correction_bias") or k.endswith("gate.bias")]
    if not ks:
        return False
    t[ks[0]] = t[ks[0]][:-1].contiguous()
    return t


def t_router_missing(t):
    ks = [k for k in t if k.endswith(("mlp.gate.weight", "router.weight", "ffn.gate.weight", "block_sparse_moe.gate.weight", "feed_forward.router.weight"))]
    if not ks:
        return False
    del t[ks[0]]
    return t


def t_dtype(t):
    k = first_expert_key(t)
    if k is None:
        return False
    t[k] = t[k].to(torch.int32) if t[k].is_floating_point() else t[k].float()
    return t


def t_int_scale(t):
    """A float scale of a quantized weight stored as integers (MXFP4's and FP4's uint8 E8M0 scales are integers by design)."""
    ks = [k for k in t if k.endswith(("_scale_inv", ".scale", "weight_scale", "qscale_weight")) and t[k].is_floating_point()]
    if not ks:
        return False
    t[ks[0]] = t[ks[0]].float().round().to(torch.int32)
    return t


MUTATIONS = {
    "n_group_bad": ("cfg", m_set("n_group", lambda v, lv: count_of(lv) + 1)),
    "topk_group_bad": ("cfg", m_set("topk_group", lambda v, lv: (lv.get("n_group") or 1) + 1)),
    "first_dense_big": ("cfg", m_set("first_k_dense_replace", lambda v, lv: lv["num_hidden_layers"] + 1)),
    "kv_heads_bad": ("cfg", m_set("num_key_value_heads", lambda v, lv: 3)),
    "vocab_more": ("cfg", m_set("vocab_size", lambda v, lv: v + 1)),
    "moe_width_bad": ("cfg", m_set("moe_intermediate_size", lambda v, lv: v + 1)),
    "scaling_neg": ("cfg", m_set("routed_scaling_factor", lambda v, lv: -1.0)),
    "scaling_str": ("cfg", m_set("routed_scaling_factor", lambda v, lv: "big")),
    "layer_types_short": ("cfg", m_set("layer_types", lambda v, lv: v[:-1] if isinstance(v, list) else None)),
    "mlp_layer_types_short": ("cfg", m_set("mlp_layer_types", lambda v, lv: v[:-1] if isinstance(v, list) else None)),
    "mlp_only_big": ("cfg", m_set("mlp_only_layers", lambda v, lv: [99])),
    "head_dim_bad": ("cfg", m_set("head_dim", lambda v, lv: v + 1)),
    "quant_unknown": ("cfg", lambda c: c.__setitem__("quantization_config", {"quant_method": "awq", "bits": 4})),
    "drop_scale": ("t", t_drop_suffix(("_scale_inv", ".scale", "weight_scale", "_scales", "weight_zero_point"))),
    "drop_blocks": ("t", t_drop_suffix(("_blocks", "weight_packed"))),
    "hash_range": ("t", t_hash_range), "bias_shape": ("t", t_bias_shape), "router_missing": ("t", t_router_missing),
    "int_dtype": ("t", t_dtype), "int_scale": ("t", t_int_scale),

    "topk0": ("cfg", m_topk(0)), "topk-1": ("cfg", m_topk(-1)), "topkbig": ("cfg", m_topk("big")),
    "fewer_layers": ("cfg", m_layers), "hidden_str": ("cfg", m_field("64")), "hidden_float": ("cfg", m_field(64.5)),
    "no_hidden": ("cfg", m_drop_field),
    "extra_tensor": ("t", t_extra), "missing_tensor": ("t", t_missing), "nan": ("t", t_nan), "bad_shape": ("t", t_shape),
    "truncated": ("file", None), "bad_json": ("json", None),
}


def mutate(src, name):
    kind, fn = MUTATIONS[name]
    p = ROOT / "mut" / f"{src.name}-{name}"
    shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(src, p)
    if kind == "cfg":
        if edit_cfg(p, fn) is False:
            return None
    elif kind == "t":
        if edit_tensors(p, fn) is False:
            return None
    elif kind == "file":
        s = max(shards(p), key=lambda s: s.stat().st_size)
        data = s.read_bytes()
        s.write_bytes(data[: len(data) // 2])
    elif kind == "json":
        (p / "config.json").write_text('{"model_type": ')
    return p


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa
            code = f"raised {type(e).__name__}: {e}"
    return code, out.getvalue(), err.getvalue()


def layout_of(src):
    """(the layout to convert to, the inspect report), or (None, the error) when the clean checkpoint fails."""
    code, out, err = run("inspect", src, "--json")
    try:
        j = json.loads(out)
    except json.JSONDecodeError:
        return None, (code, err[-300:])
    return j.get("model_type"), j


def experts_of(j):
    try:
        for l in j["layers"]:
            e = l.get("num_experts")
            if isinstance(e, int) and e > 2:
                return e
    except Exception:
        pass
    return None


HARMLESS = {"extra_tensor"}  # accepting it is no fault (refused anyway, or carried through on purpose)
INSPECT_BLIND = {"nan", "quant_unknown", "vocab_more", "scaling_neg"}  # faults in values inspect need not read


def all_families() -> list[str]:
    from tests.fixtures import FAMILIES
    from tests.hybrid_fixtures import HYBRID
    from tests.lineage_fixtures import LINEAGE
    from tests.llama4_fixtures import LLAMA4

    return [*FAMILIES, *LINEAGE, *HYBRID, "gpt_oss", "gpt_oss-mxfp4", *LLAMA4, "deepseek_v4", "deepseek_v4-q", "kimi_k2-int4"]


def main_matrix(families, commands):
    problems = []
    for fam in families:
        try:
            src = build(fam)
        except Exception as e:
            print(f"BUILD {fam}: {type(e).__name__}: {e}", flush=True)
            continue
        lay, j = layout_of(src)
        if lay is None:
            print(f"INSPECT-CLEAN-FAIL {fam}: {j}", flush=True)
            continue
        E = experts_of(j)
        for mname in MUTATIONS:
            p = mutate(src, mname)
            if p is None:
                continue
            for cmd in commands:
                out_dir = ROOT / "out" / f"{fam}-{mname}-{cmd}"
                shutil.rmtree(out_dir, ignore_errors=True)
                argv = {"inspect": ["inspect", p, "--json"],
                        "convert": ["convert", p, out_dir, "--to", lay],
                        "verify": ["verify", p, p, "--seq-len", "8", "--batch", "1"],
                        "prune": ["prune-experts", p, out_dir, "--keep", (E or 8) - 1, "--calibration-tokens", "64"],
                        "split": ["split-experts", p, out_dir, "--granularity", "2"],
                        "bench": ["bench", p, "-m", "1"]}[cmd]
                code, out, err = run(*argv)
                lines = [l for l in err.strip().splitlines() if l.strip()]
                flag = []
                if not isinstance(code, int):
                    flag.append(code)
                elif code == 1:
                    flag.append("exit1")
                if "Traceback" in err or "Traceback" in out:
                    flag.append("traceback")
                if code != 0 and len([l for l in lines if l.startswith("error") or not l.startswith(" ")]) > 1:
                    flag.append(f"multiline:{len(lines)}")
                if code != 0 and out_dir.exists():
                    flag.append("output-left")
                if code == 0 and mname not in HARMLESS and not (cmd == "inspect" and mname in INSPECT_BLIND):
                    flag.append("accepted")
                msg = (lines[-1] if lines else out.strip()[-200:])[:220]
                rec = dict(family=fam, mutation=mname, command=cmd, code=code if isinstance(code, int) else -1, flags=flag, msg=msg)
                print(json.dumps(rec), flush=True)
                if flag:
                    problems.append(rec)
                shutil.rmtree(out_dir, ignore_errors=True)
    return problems


if __name__ == "__main__":
    if len(sys.argv) > 3:
        keep = sys.argv[3].split(",")
        for k in list(MUTATIONS):
            if k not in keep:
                del MUTATIONS[k]
    fams = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] != "all" else all_families()
    cmds = sys.argv[2].split(",") if len(sys.argv) > 2 else ["inspect", "convert", "verify", "prune"]
    probs = main_matrix(fams, cmds)
    print("PROBLEMS", len(probs))
