#!/usr/bin/env python
"""mergekit-moe's own job, side by side: an MoE from a dense base and fine-tuned donors of it.

    python benchmarks/donors_vs_mergekit.py --mergekit /path/to/venv/bin/mergekit-moe [--repeat 3] [--json out.json]

The job (issue #15): a random 0.74B dense Llama (bf16, 24 layers, hidden 1536, FFN 4352, vocab 32000) and three
donors of it (the base's attention, embeddings and norms, their own FFNs) made into a 4-expert top-1 Mixtral
(each donor's FFN one expert, the base's the fourth), 2.2B parameters, 4.4 GB of output:

    mergekit-moe config.yml OUT        (gate_mode random, dtype bfloat16, experts_per_token 1)
    moesurgery upcycle BASE OUT --donor BASE --donor D1 --donor D2 --donor D3 --top-k 1 --router random --to mixtral

Both read the same four checkpoints and write the same tensors (random router rows: neither runs the model).
Rounds alternate the two tools; before every run the previous output is deleted, `sync`ed, and the page
cache dropped where allowed (else every run is warm after a warm-up of each, and the output says so). Wall
time, CPU time and exact peak RSS (wait4) of each run; medians. Target: moesurgery >= 3x faster, < 1/8 of
mergekit-moe's peak memory.

With `--gate-mode hidden` both initialise the router from prompt hidden states instead (mergekit loads the
whole base model into memory for it; moesurgery streams one layer at a time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from benchmarks.convert_io import dir_bytes, drop_caches, fmt_bytes, moesurgery_cmd, run_measured  # noqa: E402

DIMS = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4352, num_hidden_layers=24, num_attention_heads=12,
            num_key_value_heads=4, head_dim=128)
PROMPTS = ["Write a Python function that parses a CSV file.", "Solve the equation 3x + 5 = 20.",
           "Translate this sentence into French.", "Tell me a story about a dragon."]

GENERATE = r"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from moesurgery.lazy import Lazy
from moesurgery.writer import PlannedTensor, parse_size, write_checkpoint
cfg = json.loads({cfg!r})
H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
bf16 = torch.bfloat16
def rand(seed, *shape):
    return Lazy(shape, bf16, lambda: torch.empty(shape, dtype=bf16).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed)))
for d, out in enumerate({outs!r}):
    ffn_seed = 1000 * (d + 1)  # donors differ in their FFNs only
    t = [PlannedTensor("model.embed_tokens.weight", rand(1, V, H))]
    for i in range(L):
        p = f"model.layers.{{i}}."
        t += [PlannedTensor(p + "input_layernorm.weight", Lazy.full((H,), 1.0, bf16)),
              PlannedTensor(p + "post_attention_layernorm.weight", Lazy.full((H,), 1.0, bf16)),
              PlannedTensor(p + "self_attn.q_proj.weight", rand(10 + i, q, H)), PlannedTensor(p + "self_attn.k_proj.weight", rand(50 + i, kv, H)),
              PlannedTensor(p + "self_attn.v_proj.weight", rand(90 + i, kv, H)), PlannedTensor(p + "self_attn.o_proj.weight", rand(130 + i, H, q)),
              PlannedTensor(p + "mlp.gate_proj.weight", rand(ffn_seed + 3 * i, I, H)), PlannedTensor(p + "mlp.up_proj.weight", rand(ffn_seed + 3 * i + 1, I, H)),
              PlannedTensor(p + "mlp.down_proj.weight", rand(ffn_seed + 3 * i + 2, H, I))]
    t += [PlannedTensor("model.norm.weight", Lazy.full((H,), 1.0, bf16)), PlannedTensor("lm_head.weight", rand(2, V, H))]
    write_checkpoint(Path(out), t, cfg, source_name="benchmarks/donors_vs_mergekit.py", command="synthetic", max_shard_size=parse_size("2GB"))
"""


def llama_config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **DIMS, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2}


def generate(dirs: list[Path]) -> None:
    code = GENERATE.format(root=str(ROOT), cfg=json.dumps(llama_config()), outs=[str(d) for d in dirs])
    subprocess.run([sys.executable, "-c", code], check=True)
    from tests.fixtures import _save_tokenizer  # a word-level tokenizer over the vocabulary (mergekit copies the base's)

    for d in dirs:
        _save_tokenizer(d, DIMS["vocab_size"])


def mergekit_yaml(base: Path, donors: list[Path], gate_mode: str) -> str:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts_per_token: 1", "experts:"]
    for d, prompt in zip(donors, PROMPTS):
        lines += [f"  - source_model: {d}", "    positive_prompts:", f"      - {json.dumps(prompt)}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="the mergekit-moe executable (its own venv: mergekit==0.1.5)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gate-mode", choices=("random", "hidden"), default="random")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="donors-bench-", dir=args.workdir))
    try:
        base, donors = work / "base", [work / f"donor{i}" for i in (1, 2, 3)]
        generate([base, *donors])
        experts = [base, *donors]
        (work / "moe.yml").write_text(mergekit_yaml(base, experts, args.gate_mode))
        prompt_files = []
        for i, p in enumerate(PROMPTS):
            f = work / f"prompts{i}.txt"
            f.write_text(p + "\n")
            prompt_files.append(f)
        out = work / "out"
        cmds = {
            "mergekit-moe": [args.mergekit, str(work / "moe.yml"), str(out), "--i-understand-this-is-not-useful-without-training", "--quiet"],
            "moesurgery": moesurgery_cmd() + ["upcycle", str(base), str(out), *sum((["--donor", str(d)] for d in experts), []),
                                              "--top-k", "1", "--to", "mixtral", "--json"]
            + (["--router", "random"] if args.gate_mode == "random" else sum((["--prompts", str(f)] for f in prompt_files), [])),
        }
        cold = drop_caches()
        runs: dict[str, list[dict]] = {k: [] for k in cmds}
        for r in range(args.repeat + (0 if cold else 1)):  # a warm-up round when caches cannot be dropped
            for name, cmd in cmds.items():
                shutil.rmtree(out, ignore_errors=True)
                subprocess.run(["sync"], check=False)
                drop_caches()
                m = run_measured(cmd, work / f"{name}.log")
                m["output_bytes"] = dir_bytes(out)
                m.pop("stdout")
                if cold or r > 0:
                    runs[name].append(m)
                print(f"{name:13s} round {r}: {m['wall_s']:6.1f} s wall, {m['cpu_s']:6.1f} s cpu, peak RSS {fmt_bytes(m['peak_rss_bytes'])}, "
                      f"output {fmt_bytes(m['output_bytes'])}", flush=True)
        med = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s", "peak_rss_bytes", "output_bytes")}
               for name, rs in runs.items()}
        speedup = med["mergekit-moe"]["wall_s"] / med["moesurgery"]["wall_s"]
        memory = med["moesurgery"]["peak_rss_bytes"] / med["mergekit-moe"]["peak_rss_bytes"]
        result = {"machine": machine(), "job": {"base": DIMS, "donors": 3, "experts": 4, "top_k": 1, "gate_mode": args.gate_mode},
                  "cache": "cold (dropped before every run)" if cold else "warm (page cache not droppable here; one warm-up round)",
                  "median": med, "runs": runs, "speedup": speedup, "memory_fraction": memory,
                  "targets": {"speedup>=3": speedup >= 3, "memory<1/8": memory < 1 / 8}}
        print(json.dumps({k: result[k] for k in ("cache", "median", "speedup", "memory_fraction", "targets")}, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
