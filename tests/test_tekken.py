"""Mistral's tekken.json tokenizer (moesurgery/tekken.py): byte-level BPE by rank over the pattern's pieces,
ids offset by the special tokens; checked by hand on a tiny vocabulary and, where mistral-common is installed
(not a dependency), against its Tekkenizer on real text."""

from __future__ import annotations

import base64
import json

import pytest

from moesurgery.tekken import encode


def tiny_tekken(path, merges=(b"ab", b"abc", b"hi")):
    vocab = [bytes([i]) for i in range(256)] + list(merges)
    data = {"config": {"pattern": r"\p{L}+|\s+|.", "num_vocab_tokens": len(vocab), "default_vocab_size": len(vocab) + 3,
                       "default_num_special_tokens": 3, "version": "v3"},
            "vocab": [{"rank": i, "token_bytes": base64.b64encode(b).decode(), "token_str": None} for i, b in enumerate(vocab)]}
    path.write_text(json.dumps(data))
    return path


def test_merges_by_rank_and_offsets_the_special_tokens(tmp_path):
    pytest.importorskip("regex")
    path = tiny_tekken(tmp_path / "tekken.json")
    # "abcx": a+b (rank 256) then ab+c (257), x alone; " ": a piece; "hi": 258; "!": a byte
    assert encode(path, "abcx hi!") == [257 + 3, ord("x") + 3, ord(" ") + 3, 258 + 3, ord("!") + 3]


def test_equals_mistral_common(tmp_path):
    tekken = pytest.importorskip("mistral_common.tokens.tokenizers.tekken")
    import importlib.resources as res

    path = res.files("mistral_common") / "data" / "tekken_240911.json"
    from moesurgery.texts import heldout_text

    text = heldout_text(20_000) + " Héllo wörld! 日本語 12345 🤖\r\n\ttabs  and   spaces"
    assert encode(path, text) == tekken.Tekkenizer.from_file(str(path)).encode(text, bos=False, eos=False)


def test_calibration_uses_it_for_mistral_format_checkpoints(tmp_path):
    pytest.importorskip("regex")
    from moesurgery.calibration import tokenize

    tiny_tekken(tmp_path / "tekken.json")
    assert tokenize(tmp_path, "abc", 300).tolist() == [257 + 3]
