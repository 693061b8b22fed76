"""Durable writes: the new text replaces the old in one rename, and no temporary file is left behind."""

from vlkit.utils.fs import write_text_durably


def test_write_text_durably_replaces_in_place_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "latest"
    write_text_durably(target, "step_1\n")
    write_text_durably(target, "step_2\n")
    assert target.read_text() == "step_2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
