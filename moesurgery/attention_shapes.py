"""The attention tensors of a decoder layer and their shapes, for every attention kind, from the config alone
(canonical `Arch`): what `validate` checks a checkpoint against and what a skeleton (plan, dry run) holds.
Names are relative to the layer (`model.layers.{i}.`)."""

from __future__ import annotations

from .canonical import Arch


def attention_shapes(arch: Arch, index: int, linear_form: str | None = None) -> dict[str, tuple]:
    """Attention tensors (relative to the layer) and their shapes; "linear" ones are weights quantized formats hold."""
    H = arch.hidden_size
    out = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
    if arch.attention == "hybrid":
        return {**out, **hybrid_shapes(arch, index, linear_form)}
    if arch.attention == "dsv4":
        return {**out, **dsv4_shapes(arch, index)}
    if arch.attention == "mla":
        m, h = arch.mla, arch.num_heads
        qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
        if m.get("q_lora_rank"):
            out.update({"self_attn.q_a_proj.weight": (m["q_lora_rank"], H), "self_attn.q_a_layernorm.weight": (m["q_lora_rank"],),
                        "self_attn.q_b_proj.weight": (h * qk, m["q_lora_rank"])})
        else:
            out["self_attn.q_proj.weight"] = (h * qk, H)
        out.update({"self_attn.kv_a_proj_with_mqa.weight": (m["kv_lora_rank"] + m["qk_rope_head_dim"], H),
                    "self_attn.kv_a_layernorm.weight": (m["kv_lora_rank"],),
                    "self_attn.kv_b_proj.weight": (h * (m["qk_nope_head_dim"] + m["v_head_dim"]), m["kv_lora_rank"]),
                    "self_attn.o_proj.weight": (H, h * m["v_head_dim"])})
        ix = arch.indexer
        if ix and ix["types"][index] == "full":
            D = ix["head_dim"]
            out.update({"self_attn.indexer.wq_b.weight": (ix["heads"] * D, m["q_lora_rank"]), "self_attn.indexer.wk.weight": (D, H),
                        "self_attn.indexer.k_norm.weight": (D,), "self_attn.indexer.k_norm.bias": (D,),
                        "self_attn.indexer.weights_proj.weight": (ix["heads"], H)})
        return out
    d, q, kv = arch.head_dim, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    out.update({"self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
                "self_attn.o_proj.weight": (H, q)})
    if arch.qkv_bias:
        out.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if arch.o_bias:
        out["self_attn.o_proj.bias"] = (H,)
    if arch.sinks:
        out["self_attn.sinks"] = (arch.num_heads,)
    if arch.qk_norm == "head":
        out.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    elif arch.qk_norm == "full":
        out.update({"self_attn.q_norm.weight": (q,), "self_attn.k_norm.weight": (kv,)})
    return out


def dsv4_shapes(arch: Arch, index: int) -> dict[str, tuple]:
    """DeepSeek-V4: hyper-connection weights, the shared-KV attention, and the layer's compressor (+ indexer on CSA)."""
    d, H, D, h = arch.dsv4, arch.hidden_size, arch.head_dim, arch.num_heads
    N, q, G, r = d["hc_mult"], d["q_lora_rank"], d["o_groups"], d["o_lora_rank"]
    out = {f"{s}_hc.{p}": shape for s in ("attn", "ffn") for p, shape in (("fn", ((2 + N) * N, N * H)), ("base", ((2 + N) * N,)), ("scale", (3,)))}
    out.update({"self_attn.q_a_proj.weight": (q, H), "self_attn.q_a_norm.weight": (q,), "self_attn.q_b_proj.weight": (h * D, q),
                "self_attn.kv_proj.weight": (D, H), "self_attn.kv_norm.weight": (D,), "self_attn.o_a_proj.weight": (G * r, h * D // G),
                "self_attn.o_b_proj.weight": (H, G * r), "self_attn.sinks": (h,)})
    kind = arch.layer_types[index]
    if kind == "sliding_attention":
        return out
    m = d["compress_rates"][kind]
    c = "self_attn.compressor."
    width = 2 * D if kind == "compressed_sparse_attention" else D
    out.update({c + "kv_proj.weight": (width, H), c + "gate_proj.weight": (width, H), c + "position_bias": (m, width), c + "kv_norm.weight": (D,)})
    if kind == "compressed_sparse_attention":
        i, nh, hd = c + "indexer.", d["index_n_heads"], d["index_head_dim"]
        out.update({i + "kv_proj.weight": (2 * hd, H), i + "gate_proj.weight": (2 * hd, H), i + "position_bias": (m, 2 * hd),
                    i + "kv_norm.weight": (hd,), i + "q_b_proj.weight": (nh * hd, q), i + "scorer.weights_proj.weight": (nh, H)})
    return out


def hybrid_shapes(arch: Arch, index: int, linear_form: str | None) -> dict[str, tuple]:
    """Qwen3-Next / 3.5: a Gated DeltaNet layer (grouped or flat projections) or a gated attention layer."""
    H, d, h, kv = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads
    if arch.layer_types[index] == "full_attention":
        return {"self_attn.q_proj.weight": (2 * h * d, H), "self_attn.k_proj.weight": (kv * d, H), "self_attn.v_proj.weight": (kv * d, H),
                "self_attn.o_proj.weight": (H, h * d), "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    la = arch.linear_attn
    nk, nv, dk, dv = la["nk"], la["nv"], la["dk"], la["dv"]
    conv = 2 * nk * dk + nv * dv
    if linear_form == "flat":
        proj = {"in_proj_qkv.weight": (conv, H), "in_proj_z.weight": (nv * dv, H), "in_proj_b.weight": (nv, H), "in_proj_a.weight": (nv, H)}
    else:
        proj = {"in_proj_qkvz.weight": (conv + nv * dv, H), "in_proj_ba.weight": (2 * nv, H)}
    return {**{"linear_attn." + k: s for k, s in proj.items()}, "linear_attn.conv1d.weight": (conv, 1, la["kernel"]),
            "linear_attn.dt_bias": (nv,), "linear_attn.A_log": (nv,), "linear_attn.norm.weight": (dv,), "linear_attn.out_proj.weight": (H, nv * dv)}
