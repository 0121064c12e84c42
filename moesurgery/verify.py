"""`verify`: is CANDIDATE the same function as REFERENCE? Exact, or by how much not.

Both models run in lockstep, one decoder layer at a time (memory: one layer of each plus
activations). At every layer the reference's real FFN input is fed to both FFN/MoE blocks (block
error, routing agreement), while each model also runs end to end on its own (logits error, top-1
agreement, KL, perplexity). Tensors that should be untouched are compared byte for byte.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from .canonical import Model, MoE
from .errors import BadInputError, UsageError
from .model_io import Opened, open_model
from .runtime.model import LoadedLayer, Runtime, ffn_forward, load_ffn

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype: unknown dtype {name!r} (use float32, bfloat16, float16)") from None


def check_comparable(ref: Model, cand: Model) -> None:
    a, b = ref.arch, cand.arch
    for what, x, y in (
        ("number of layers", a.num_layers, b.num_layers),
        ("vocabulary size", a.vocab_size, b.vocab_size),
        ("hidden size", a.hidden_size, b.hidden_size),
        ("attention kind", a.attention, b.attention),
    ):
        if x != y:
            raise BadInputError(f"models are not comparable: {what} differs ({x} vs {y})")
    if a.attention == "gqa" and (a.num_heads, a.num_kv_heads, a.head_dim) != (b.num_heads, b.num_kv_heads, b.head_dim):
        raise BadInputError(
            f"models are not comparable: attention heads differ ({a.num_heads}/{a.num_kv_heads}x{a.head_dim} vs {b.num_heads}/{b.num_kv_heads}x{b.head_dim})"
        )


def tokenize_text(opened: Opened, text: str) -> tuple[list[int], str]:
    """Token ids of `text` with the reference's tokenizer.json, else UTF-8 bytes (said in the report)."""
    tok_file = opened.source.path / "tokenizer.json"
    if tok_file.exists():
        try:
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tok_file)).encode(text).ids, "tokenizer.json"
        except ImportError:
            pass
    tekken = opened.source.path / "tekken.json"
    if tekken.exists():  # Mistral's own tokenizer (checkpoints in Mistral's format)
        from .tekken import encode

        ids = encode(tekken, text)
        if ids is not None:
            return ids, "tekken.json"
    vocab = opened.model.arch.vocab_size
    return [b % vocab for b in text.encode()], "utf-8 bytes (no tokenizer.json or `tokenizers` not installed)"


TEXT_TOKENS_CAP = 8192  # --text without --batch: score the text up to this many tokens
TEXT_WINDOW = 2048  # --text without --seq-len: windows this long (or the model's positions, if fewer)
RANDOM_BATCH, RANDOM_SEQ_LEN = 2, 64


def make_inputs(ref: Opened, text: str | None, tokens: list[int] | None, batch: int | None, seq_len: int | None, seed: int) -> tuple[torch.Tensor, str]:
    if text is not None:
        ids, how = tokenize_text(ref, text)
        vocab = ref.model.arch.vocab_size
        if ids and max(ids) >= vocab:
            raise BadInputError(f"--text: the reference's tokenizer gives id {max(ids)}, outside its vocabulary (size {vocab})")
        if len(ids) < 2:
            raise BadInputError("--text: the text has fewer than 2 tokens")
        length = min(seq_len or min(TEXT_WINDOW, ref.model.arch.max_position_embeddings), len(ids))
        rows = max(1, min(batch, len(ids) // length) if batch else min(TEXT_TOKENS_CAP, len(ids)) // length)
        return torch.tensor(ids[: rows * length]).view(rows, length), f"text, tokenized with {how} ({len(ids)} tokens)"
    if tokens is not None:
        if not tokens:
            raise UsageError("--tokens: no token ids given")
        vocab = ref.model.arch.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"--tokens: id {bad[0]} is outside the vocabulary (size {vocab})")
        return torch.tensor(tokens).view(1, -1), "given token ids"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ref.model.arch.vocab_size, (batch or RANDOM_BATCH, seq_len or RANDOM_SEQ_LEN), generator=gen), f"random tokens (seed {seed})"


def available_memory() -> int:
    """Bytes this process may still allocate (MemAvailable), or a large number where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50


def check_size(model: Model, batch: int, seq_len: int, dtype: torch.dtype) -> None:
    """Refuse inputs the model cannot position or this machine cannot hold, before any work."""
    a = model.arch
    if seq_len > a.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's {a.max_position_embeddings} positions (max_position_embeddings)")
    per_token = a.hidden_size * dtype.itemsize * 12 + a.num_heads * seq_len * 4 * 2  # streams, FFN I/O, one row of scores
    need = batch * seq_len * per_token + CHUNK_LOGITS * 4 * a.vocab_size * 6
    if need > available_memory():
        raise UsageError(f"{batch} x {seq_len} tokens need about {need / 1e9:.1f} GB; {available_memory() / 1e9:.1f} GB are available "
                         "(lower --batch / --seq-len)")


CHUNK_LOGITS = 2048  # rows of [T, V] logits in hand at once
ATTN_BYTES = 1 << 28  # attention scores in hand at once (rows of the batch are run in groups under this)


def row_groups(batch: int, heads: int, seq_len: int) -> list[slice]:
    """Groups of batch rows whose [rows, heads, T, T] fp32 scores stay under ATTN_BYTES."""
    per_row = max(1, heads * seq_len * seq_len * 4)
    n = max(1, ATTN_BYTES // per_row)
    return [slice(i, min(i + n, batch)) for i in range(0, batch, n)]


def identical(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Same bytes; a tensor missing on one side counts as identical when the other is all zero."""
    if a is None or b is None:
        other = a if b is None else b
        return other is not None and not bool(other.any())
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, relative error = max abs error / max |want|). NaN/Inf count as equal where both
    sides hold the same one (the same function), as an infinite error where only one does."""
    diff, scale = error_parts(got, want)
    return diff, diff / scale if scale > 0 else diff  # an all-zero reference: the absolute error


def error_parts(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, max finite |want|), NaN-aware as `errors`."""
    g, w = got.float(), want.float()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    diff = torch.where(same, torch.zeros_like(g), (g - w).abs()).nan_to_num(nan=float("inf"))
    finite = w.abs()[torch.isfinite(w)]
    return (diff.max().item() if diff.numel() else 0.0), (finite.max().item() if finite.numel() else 0.0)


def nonfinite_tensors(model: Model, most: int = 4) -> list[str]:
    """Names of (up to `most`) tensors holding NaN or Inf, read one at a time."""
    from .canonical import model_tensors

    found = []
    for name, t in model_tensors(model):
        if t.dtype.is_floating_point and not bool(torch.isfinite(t.load()).all()):
            found.append(name)
            if len(found) >= most:
                break
    return found


def routing_agreement(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Mean fraction of each token's chosen experts that both pick (same expert numbering only)."""
    if a is None or b is None or a.shape != b.shape:
        return None
    hits = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float()  # [T, k]
    return hits.mean().item()


def verify(
    reference,
    candidate,
    *,
    text: str | None = None,
    tokens: list[int] | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "loop",
) -> dict:
    if (batch is not None and batch < 1) or (seq_len is not None and seq_len < 2):
        raise UsageError("--batch must be >= 1 and --seq-len >= 2")
    if text is not None and tokens is not None:
        raise UsageError("give --text or --tokens, not both")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    ref_o, cand_o = open_model(reference), open_model(candidate)
    ref, cand = ref_o.model, cand_o.model
    check_comparable(ref, cand)
    if text is None and tokens is None:
        check_size(ref, batch or RANDOM_BATCH, seq_len or RANDOM_SEQ_LEN, dtype)
    ids, input_kind = make_inputs(ref_o, text, tokens, batch, seq_len, seed)
    check_size(ref, ids.shape[0], ids.shape[1], dtype)
    r_rt = Runtime(ref, device, dtype, backend)
    c_rt = Runtime(cand, device, dtype, backend)
    tol = TOLERANCE[dtype]
    groups = row_groups(ids.shape[0], max(ref.arch.num_heads, cand.arch.num_heads), ids.shape[1])

    changed_top: list[str] = []  # embed, norm, lm_head (reported first)
    changed: list[str] = []
    untouched = 0

    def tally(name: str, same: bool) -> bool:
        nonlocal untouched
        if same:
            untouched += 1
        else:
            (changed if name.startswith("model.layers.") else changed_top).append(name)
        return same

    def compare(name: str, a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return tally(name, identical(a, b))

    def load_pair(i: int):
        """Both models' layer i: raw attention tensors read once, compared, then cast for compute."""
        r_layer, c_layer = ref.layers[i], cand.layers[i]
        r_raw = {k: v.load() for k, v in r_layer.attn.items()}
        c_raw = {k: v.load() for k, v in c_layer.attn.items()}
        same = [identical(r_raw.get(k), c_raw.get(k)) for k in sorted(set(r_raw) | set(c_raw))]
        names = sorted(set(r_raw) | set(c_raw))
        r_w = LoadedLayer(i, {k: t.to(r_rt.device, dtype) for k, t in r_raw.items()}, load_ffn(r_layer.ffn, r_rt.device, dtype))
        c_w = LoadedLayer(i, {k: t.to(c_rt.device, dtype) for k, t in c_raw.items()}, load_ffn(c_layer.ffn, c_rt.device, dtype))
        return list(zip(names, same)), r_w, c_w

    r_states = [{"ids": ids[g].to(r_rt.device)} for g in groups]  # per group of rows: what a layer hands the next (and the token ids)
    c_states = [{"ids": ids[g].to(c_rt.device)} for g in groups]

    def in_groups(fn, x, states):
        """fn(rows, state) over groups of batch rows (bounded attention scores), outputs concatenated."""
        return torch.cat([fn(x[g], state) for g, state in zip(groups, states)])

    # each big tensor is read once: the embeddings are compared and handed to the runtimes; the
    # heads are read, compared and used at the end
    r_embed, c_embed = ref.embed.load(), cand.embed.load()
    embed_same = compare("model.embed_tokens.weight", r_embed, c_embed)
    r_rt.use_embed(r_embed)
    c_rt.use_embed(c_embed)
    del r_embed, c_embed
    compare("model.norm.weight", ref.norm.load(), cand.norm.load())

    with torch.no_grad(), ThreadPoolExecutor(max_workers=1) as prefetch:
        positions = torch.arange(ids.shape[1], device=r_rt.device)
        r_rope, c_rope = r_rt.rope(0, ids.shape[1]), c_rt.rope(0, ids.shape[1])
        x_r, x_c = r_rt.embed(ids), c_rt.embed(ids)
        layers = []
        n = len(ref.layers)
        pending = prefetch.submit(load_pair, 0) if n else None
        for i in range(n):
            same_attn, r_w, c_w = pending.result()
            pending = prefetch.submit(load_pair, i + 1) if i + 1 < n else None  # read the next layer meanwhile
            attn_untouched = all([tally(f"model.layers.{i}.{k}", same) for k, same in same_attn])
            in_step = torch.equal(x_c, x_r)  # the candidate's stream still equals the reference's
            x_r = in_groups(lambda x, st: r_rt.attention(x, r_w, positions, r_rope, state=st)[0], x_r, r_states)
            h = r_rt.ffn_input(x_r, r_w)  # the reference's real FFN input, fed to both blocks
            y_r, idx_r = ffn_forward(h, r_w.ffn, backend, return_routing=True, ids=ids)
            y_c, idx_c = ffn_forward(h, c_w.ffn, backend, return_routing=True, ids=ids)
            abs_err, rel_err = errors(y_c, y_r)
            layers.append({
                "index": i,
                "reference_kind": "moe" if isinstance(ref.layers[i].ffn, MoE) else "dense",
                "candidate_kind": "moe" if isinstance(cand.layers[i].ffn, MoE) else "dense",
                "max_abs_err": abs_err,
                "rel_err": rel_err,
                "routing_agreement": routing_agreement(idx_r, idx_c),
            })
            if in_step and attn_untouched:  # same input, same attention: the candidate's layer is x_r + y_c
                x_c = c_rt.ffn_output(x_r, c_w, y_c)
                c_states = [dict(st) for st in r_states]
            else:
                x_c = in_groups(lambda x, st: c_rt.decoder_layer(x, c_w, positions, c_rope, state=st)[0], x_c, c_states)
            x_r = r_rt.ffn_output(x_r, r_w, y_r)
            del r_w, c_w
        r_head = None if ref.lm_head is None else ref.lm_head.load()
        c_head = None if cand.lm_head is None else cand.lm_head.load()
        if r_head is None and c_head is None:  # both tied: the embeddings' comparison
            tally("lm_head.weight", embed_same)
        else:
            compare("lm_head.weight", ref.embed.load() if r_head is None else r_head, cand.embed.load() if c_head is None else c_head)
        scores = score_logits(r_rt, c_rt, x_r, x_c, r_head, c_head, ids)
        del r_head, c_head

    worst = max(layers, key=lambda l: l["rel_err"]) if layers else None
    rel_err = scores["rel_err"]
    exact = rel_err <= tol and all(l["rel_err"] <= tol for l in layers)
    report = {
        "reference": ref_o.source.name,
        "candidate": cand_o.source.name,
        "reference_layout": ref.family,
        "candidate_layout": cand.family,
        "inputs": {"kind": input_kind, "batch": ids.shape[0], "seq_len": ids.shape[1], "tokens_scored": ids.shape[0] * (ids.shape[1] - 1)},
        "device": str(r_rt.device),
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tol,
        "verdict": "exact" if exact else "lossy",
        "untouched": {"identical": untouched, "changed": changed_top + changed},
        "logits": {k: scores[k] for k in ("max_abs_err", "rel_err", "top1_agreement", "kl")},
        "layers": layers,
        "worst_layer": worst["index"] if worst else None,
        "notes": ref_o.notes + [n for n in cand_o.notes if n not in ref_o.notes],
    }
    if text is not None:
        report["perplexity"] = {"reference": scores["ppl_ref"], "candidate": scores["ppl_cand"]}
    if scores["nonfinite"] or not all(math.isfinite(l["max_abs_err"]) for l in layers):
        report["nonfinite"] = {"reference": nonfinite_tensors(ref), "candidate": nonfinite_tensors(cand)}
        for side, names in report["nonfinite"].items():
            if names:
                report["notes"].append(f"the {side} holds NaN/Inf values in {', '.join(names)}")
    return report


def score_logits(r_rt: Runtime, c_rt: Runtime, x_r: torch.Tensor, x_c: torch.Tensor, r_head, c_head, ids: torch.Tensor) -> dict:
    """Logit errors, top-1 agreement, KL(ref || cand) and both perplexities, CHUNK_LOGITS positions at a time
    (the [B, T, V] logits of a long text are never in memory at once)."""
    B, T = x_r.shape[:2]
    flat_r, flat_c = x_r.reshape(B * T, *x_r.shape[2:]), x_c.reshape(B * T, *x_c.shape[2:])  # [B*T, H] (or [B*T, streams, H])
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -100, dtype=ids.dtype)], dim=1).reshape(-1).to(x_r.device)  # [B*T]
    max_diff = max_scale = kl_sum = top1 = nll_r = nll_c = 0.0
    nonfinite = False
    for a in range(0, B * T, CHUNK_LOGITS):
        lr, lc = r_rt.head(flat_r[a : a + CHUNK_LOGITS], r_head), c_rt.head(flat_c[a : a + CHUNK_LOGITS], c_head)  # [n, V] fp32
        d, sc = error_parts(lc, lr)
        max_diff, max_scale = max(max_diff, d), max(max_scale, sc)
        nonfinite = nonfinite or not bool(torch.isfinite(lr).all() and torch.isfinite(lc).all())
        logp_r, logp_c = lr.log_softmax(-1), lc.log_softmax(-1)
        kl_sum += (logp_r.exp() * (logp_r - logp_c)).sum(-1).sum().item()
        top1 += (lr.argmax(-1) == lc.argmax(-1)).sum().item()
        t = targets[a : a + CHUNK_LOGITS]
        nll_r += F.nll_loss(logp_r, t, ignore_index=-100, reduction="sum").item()
        nll_c += F.nll_loss(logp_c, t, ignore_index=-100, reduction="sum").item()
    scored = max(1, B * (T - 1))
    return {
        "max_abs_err": max_diff, "rel_err": max_diff / max_scale if max_scale > 0 else max_diff,
        "top1_agreement": top1 / (B * T), "kl": max(kl_sum / (B * T), 0.0) if math.isfinite(kl_sum) else kl_sum,
        "ppl_ref": _exp(nll_r / scored), "ppl_cand": _exp(nll_c / scored), "nonfinite": nonfinite,
    }


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy)."""
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device))
    return math.exp(loss.item())


def read_tokens(spec: str) -> list[int]:
    """`--tokens`: comma/space separated ids, or a file holding them."""
    path = Path(spec)
    text = path.read_text() if path.is_file() else spec
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError("--tokens: expected integer token ids (comma or space separated) or a file of them") from None
