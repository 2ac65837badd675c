"""Edits of mesh.yaml by meshctl (config/edit.py) keep every comment and byte they do not touch."""

from __future__ import annotations

from pathlib import Path

import pytest

from aivo_mesh.config import parse_mesh
from aivo_mesh.config.edit import add_revocations
from aivo_mesh.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = (ROOT / "mesh.yaml").read_text()
PIN = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


@pytest.mark.parametrize("tail", [
    "",                                                                       # no certificates block
    "certificates: {}\n",                                                     # empty, flow
    "certificates:\n  pins: {}\n",                                            # without revoked
    "certificates:\n  revoked: []\n  pins: {}\n",                             # empty flow list
    "certificates:\n  # why each is here\n  revoked:\n    - serial: \"ab\"   # old\n"
    "      note: kept\n  pins: {}\n# trailing comment\n",                     # a block list with comments
])
def test_revocations_are_added_and_everything_else_is_kept(tail: str) -> None:
    text = BASE + tail
    before = parse_mesh(text, "mesh.yaml").certificates.revoked
    edited, mesh = add_revocations(text, [{"serial": "1f2e", "spki": PIN, "identity": "auth-svc", "note": "a: b #c"},
                                          {"serial": "0ab"}])
    assert edited.startswith(BASE)  # the whole document above the block, comments included, unchanged
    for line in tail.splitlines():
        if "#" in line:
            assert line in edited
    revoked = mesh.certificates.revoked
    assert revoked[:len(before)] == before
    added = [(r.serial, r.spki, r.identity, r.note) for r in revoked[len(before):]]
    expected = [("1f2e", PIN, "auth-svc", "a: b #c"), ("ab", None, None, "")]
    # "0ab" is the serial "ab" (normalised): not added twice where the list already has it.
    assert added == (expected[:1] if before else expected)
    # Again: nothing is duplicated.
    again, mesh2 = add_revocations(edited, [{"serial": "1f2e"}])
    assert again == edited and mesh2.certificates.revoked == revoked


def test_a_one_line_list_with_items_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError) as exc:
        add_revocations(BASE + 'certificates:\n  revoked: [{serial: "ab"}]\n', [{"serial": "cd"}])
    assert "certificates.revoked" in str(exc.value)
