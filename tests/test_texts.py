"""Built-in texts and mixing several calibration texts (texts.interleave; the CLI's repeated --calibration)."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from moesurgery.cli import main
from moesurgery.texts import calibration_text, heldout_text, interleave


def test_calibration_and_heldout_are_disjoint():
    cal, held = calibration_text(10**7), heldout_text(10**7)
    assert len(cal) > 100_000 and len(held) > 20_000
    assert held[:2000] not in cal


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", min_size=0, max_size=3000), min_size=1, max_size=4), st.integers(5, 400))
def test_interleave_keeps_every_character_in_order(texts, size):
    mixed = interleave(texts, size)
    assert len(mixed) == sum(map(len, texts))
    if len(texts) == 1:
        assert mixed == texts[0]


def test_interleave_gives_equal_shares_up_front():
    a, b = "alpha " * 20_000, "beta\n" * 20_000
    head = interleave([a, b], 1000)[:40_000]
    assert abs(head.count("alpha") * 6 - head.count("beta") * 5) < 2000  # ~half the characters each
    assert "alph\n" not in head and "bet a" not in head  # cut at whitespace


def test_split_experts_mixes_repeated_calibration(tmp_path, capsys):
    text = tmp_path / "legal.txt"
    text.write_text("The licensor grants you a perpetual licence.\n" * 400)
    rc = main(["split-experts", "tiny:llama", str(tmp_path / "o"), "--experts", "6", "--top-k", "2", "--shared", "2",
               "--calibration", "pydoc", "--calibration", str(text), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["name"] == "pydoc (built-in Python documentation) + legal.txt (interleaved)"


def test_recipe_calibration_list(tmp_path, capsys):
    text = tmp_path / "more.txt"
    text.write_text("Another text of another kind, repeated. " * 300)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"command = 'split-experts'\n[options]\nexperts = 6\ntop_k = 2\nshared = 2\ncalibration = ['pydoc', '{text}']\n")
    assert main(["split-experts", "tiny:llama", str(tmp_path / "o"), "--recipe", str(recipe), "--json"]) == 0
    assert "more.txt" in json.loads(capsys.readouterr().out)["calibration"]["name"]
    recipe.write_text("command = 'split-experts'\n[options]\nexperts = 6\ntop_k = 2\ncalibration = [1]\n")
    assert main(["split-experts", "tiny:llama", str(tmp_path / "o"), "--recipe", str(recipe), "--dry-run"]) == 2
    assert "a string or a list of strings" in capsys.readouterr().err


def _info(path, nodes):
    import gzip

    body = "This is a.info, produced by makeinfo.\n" + "".join(f"\x1f\nFile: a.info,  Node: {name},  Up: Top\n\n{text}\n" for name, text in nodes)
    with gzip.open(path, "wt") as f:
        f.write(body)


def test_manuals_text_leaves_licences_out(tmp_path):
    import pytest

    from moesurgery.errors import BadInputError
    from moesurgery.texts import manuals_text

    _info(tmp_path / "a.info.gz", [("Top", "The tool sorts lines.\n\nCopyright (C) 2020 Free Software Foundation."),
                                   ("Invoking", "Use the -r option to reverse the order."),
                                   ("GNU Free Documentation License", "You may copy this document verbatim."),
                                   ("GNU GPL", "The licensee shall distribute."), ("Concept Index", "* sort: Top.")])
    (tmp_path / "b.info").write_text("\x1f\nFile: b.info,  Node: Top\n\nThe other manual.\n")
    text = manuals_text(str(tmp_path))
    assert "sorts lines" in text and "reverse the order" in text and "The other manual" in text
    assert not any(w in text for w in ("Copyright", "verbatim", "licensee", "sort: Top"))
    with pytest.raises(BadInputError, match="GNU info manuals"):
        manuals_text(str(tmp_path / "none"))
