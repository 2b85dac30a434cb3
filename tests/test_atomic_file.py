"""Local files written whole or not at all (uniinst/atomic_file.py)."""

from __future__ import annotations

import os

import pytest

from uniinst.atomic_file import atomic_output


def test_a_file_appears_whole_with_the_permissions_of_one_written_in_place(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_output(target) as f:
        f.write(b"first part, ")
        assert not target.exists()  # nothing under the name until the block ends
        f.write(b"second part")
    assert target.read_bytes() == b"first part, second part"
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert os.stat(target).st_mode == os.stat(plain).st_mode
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_output(target) as f:
            f.write(b"half")
            raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
