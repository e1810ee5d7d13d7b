"""atomic_write: the one way featx replaces a result, table, plot or checkpoint file."""
import pytest

from featx.files import atomic_write


def test_a_finished_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"  # folders are created
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new")
        assert not path.exists()  # nothing at the final name until the block ends
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_earlier_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "best.pt"
    path.write_text("earlier")
    with pytest.raises(OSError, match="disk"):
        with atomic_write(path, suffix=".pt") as tmp:
            assert tmp.name.endswith(".pt")
            tmp.write_text("half")
            raise OSError(28, "disk full")
    assert path.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
