"""The model card every output gets: README.md in the Hub's convention (YAML front matter, then what
was done, how exact it is, and how to load it). The source's own card is credited, not copied."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .units import human_count


def source_license(source_dir: Path | None) -> str | None:
    """The `license:` of the source's README.md front matter, if it names one."""
    if source_dir is None:
        return None
    readme = Path(source_dir) / "README.md"
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    lic = re.search(r"^license:\s*(\S.*)$", m.group(1), re.M)
    return lic.group(1).strip().strip("'\"") if lic else None


def _yaml(value) -> str:
    return json.dumps(value)  # JSON scalars and lists are YAML


def model_card(report: dict, *, source_name: str, source_dir: Path | None, repo_id: str | None, config: dict) -> str:
    """README.md for an output described by a surgery or convert `report`."""
    wrapper = "text_config" in config
    tags = ["moe", "moesurgery", config.get("model_type", ""), report.get("operation", "convert")]
    front = {
        "base_model": repo_id or source_name,
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "tags": [t for t in tags if t],
        "pipeline_tag": "image-text-to-text" if wrapper else "text-generation",
    }
    lic = source_license(source_dir)
    if lic:
        front["license"] = lic
    lines = ["---"] + [f"{k}: {_yaml(v)}" for k, v in front.items()] + ["---", ""]
    arch = (config.get("architectures") or ["AutoModelForCausalLM"])[0]
    lines += [f"# {Path(report['output']).name}", "",
              f"`{source_name}` ({report['source_layout']}) reshaped by moesurgery "
              f"into the `{report['target_layout']}` layout" + (f", inside its `{config['model_type']}` wrapper (vision parts unchanged)." if wrapper else "."),
              "", "```", report.get("command", ""), "```", ""]
    if "experts" in report:
        src_moe = report.get("source_experts")
        lines += ["| | source | output |", "|---|---|---|",
                  f"| layout | {report['source_layout']} | {report['target_layout']} |",
                  f"| parameters (total / active per token) | {human_count(report['source_params_total'])} / {human_count(report['source_params_active'])} "
                  f"| {human_count(report['params_total'])} / {human_count(report['params_active'])} |"]
        if src_moe:
            lines.append(f"| routed experts x width, top-k | {src_moe} | {report['experts']} x {report['expert_width']}, top-{report['top_k']} |")
        else:
            lines.append(f"| routed experts x width, top-k | dense | {report['experts']} x {report['expert_width']}, top-{report['top_k']} |")
        lines += [f"| shared expert width | {report.get('source_shared_width', 0)} | {report['shared_width']} |",
                  f"| MoE layers | | {report['moe_layers']} of {report['layers']} |", ""]
    verdict = report.get("verdict", report.get("expected"))
    lines += ["## Exactness", "", f"Verdict: **{verdict}**" + (" (the same function as the source)." if verdict == "exact" else "."), ""]
    check = report.get("check")
    if check:
        lines.append(f"Quick check ({check['inputs']}, layers {[l['index'] for l in check['layers']]}): max relative error {check['rel_err']:.2e}.")
    for reason in report.get("lossy_reasons", []):
        lines.append(f"- lossy: {reason}")
    measured = report.get("measured")
    if measured and "rel_err" in measured[0]:
        mean = sum(m["rel_err"] for m in measured) / len(measured)
        lines.append(f"- measured FFN relative error {mean:.3f} (mean over layers)")
    cal = report.get("calibration")
    if cal:
        lines.append(f"- calibration text: {cal['name']}, {cal['tokens']} tokens")
    lines += ["", f"Check it yourself: `moesurgery verify {source_name} {report['output']} --text pydoc`.", ""]
    lines += ["## Use", "", "```python", f"from transformers import {arch if not arch.startswith('Auto') else 'AutoModelForCausalLM'}",
              f"model = {arch if not arch.startswith('Auto') else 'AutoModelForCausalLM'}.from_pretrained(\"{report['output']}\")", "```", "",
              "```bash", f"vllm serve {report['output']}", "```", ""]
    if report.get("serving"):
        lines += ["Serving notes (checked when it was written):", ""] + [f"- {w}" for w in report["serving"]] + [""]
    lines += ["## Credits", "", f"The weights are `{source_name}`'s" + (f" (see its model card, https://huggingface.co/{repo_id})" if repo_id else "")
              + ", rearranged; its license and terms apply. This card describes only what moesurgery did.", ""]
    return "\n".join(lines)
