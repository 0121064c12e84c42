"""Do moesurgery's MoE outputs run in llama.cpp as the dense model they were made from?

    python benchmarks/llama_cpp_check.py --llama-cpp DIR [--json out.json] [--work DIR]

DIR: llama.cpp's source (for `convert_hf_to_gguf.py` and its gguf-py), e.g. the `vendor/llama.cpp` of the
llama-cpp-python sdist; the Python running this needs `llama_cpp` (llama-cpp-python, built from that sdist
in ~9 min on 2 cores), torch, transformers, safetensors, tokenizers. Not in CI: the build alone would take
a third of its budget; results go to BENCHMARKS.md ("serving").

SmolLM2-135M (dense, tied embeddings; tests/real_model.py builds it) is upcycled exactly into each MoE
layout llama.cpp supports that a Llama source can become (mixtral, qwen2_moe, deepseek v1; glm4_moe
converts only with GLM's own tokenizer), converted to an f32 GGUF with llama.cpp's own converter and run
by llama.cpp on 128 tokens of real text (pydoc_data.topics). Reported: the max |log-prob| difference over
the vocabulary against transformers on the *dense source*, with an f32 KV cache (the f16 default adds
~0.02) and top-1 agreement. Expected within f32 rounding (~1e-4) wherever llama.cpp computes the layout as
transformers does; the cases where it does not (qwen2moe / deepseek graphs do not renormalise top-k, so
only top-k = all experts is exact there) are the serving limits moesurgery warns about.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = {  # name -> (upcycle arguments, llama.cpp should match)
    "mixtral g4 n8 k4 (sparse, two virtual groups)": (["--granularity", "4", "--experts", "8", "--top-k", "4", "--to", "mixtral"], True),
    "qwen2_moe g4 n4 k4 (top-k = all experts)": (["--granularity", "4", "--experts", "4", "--top-k", "4", "--to", "qwen2_moe"], True),
    "qwen2_moe g2 n2 k2 + 2 shared (the 1/2 gate)": (["--granularity", "2", "--experts", "2", "--top-k", "2", "--shared", "2", "--to", "qwen2_moe"], True),
    "qwen2_moe g4 n8 k4 (sparse: needs renormalisation)": (["--granularity", "4", "--experts", "8", "--top-k", "4", "--to", "qwen2_moe"], False),
}


def prompt(tokenizer_json: Path, n: int = 128) -> list[int]:
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))[:4000]
    return Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids[:n]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def hf_logprobs(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return log_softmax(model(input_ids=torch.tensor([ids])).logits[0].numpy())


def llama_logprobs(gguf: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), logits_all=True, n_ctx=512, verbose=False, n_threads=2, type_k=0, type_v=0)  # f32 KV cache
    llm.eval(ids)
    return log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float32))


def convert(llama_cpp: Path, model: Path, out: Path) -> str | None:
    proc = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(llama_cpp / "gguf-py"), "PATH": "/usr/bin:/bin"})
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moesurgery-llama-cpp"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from tests.real_model import smollm2_checkpoint

    dense = Path(smollm2_checkpoint())
    args.work.mkdir(parents=True, exist_ok=True)
    ids = prompt(dense / "tokenizer.json")
    ref = hf_logprobs(dense, ids)
    rows = []
    for name, (flags, expect) in {"dense SmolLM2 (the source)": ([], True), **CASES}.items():
        out = args.work / name.split(" ")[0].replace("/", "")
        out = out.with_name(out.name + str(abs(hash(name)) % 10000))
        t0 = time.time()
        if flags:
            subprocess.run([sys.executable, "-m", "moesurgery", "upcycle", str(dense), str(out), *flags, "--overwrite"], check=True,
                           capture_output=True, cwd=REPO)
        model = out if flags else dense
        gguf = args.work / (model.name + ".gguf")
        err = convert(args.llama_cpp, model, gguf)
        row = {"case": name, "expected_match": expect, "error": err}
        if err is None:
            lp = llama_logprobs(gguf, ids)
            row.update(max_abs_logprob_diff=float(np.nanmax(np.abs(lp - ref))), top1=float((lp.argmax(-1) == ref.argmax(-1)).mean()),
                       nan=int(np.isnan(lp).sum()))
            gguf.unlink()
        row["seconds"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
