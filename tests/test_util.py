"""Shared helpers: the one atomic file writer every stage uses."""
import os

import pytest

from pipeline.util import replaced_atomically, write_file_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with replaced_atomically(path) as tmp:
            tmp.write_bytes(b"half of the n")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_a_finished_write_replaces_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    write_file_atomic(path, "né", fsync=True)
    assert path.read_bytes() == "né".encode("utf-8")
    with replaced_atomically(path) as tmp:
        assert tmp.parent == path.parent and tmp != path   # same folder: os.replace stays atomic
        tmp.write_bytes(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_killed_write_leaves_one_temporary_that_the_next_write_reuses(tmp_path):
    path = tmp_path / "transcoder.safetensors"
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(b"old")
        left_by_a_kill = tmp
    left_by_a_kill.write_bytes(b"x" * 1000)   # as if the next writer died before its rename
    write_file_atomic(path, b"new")
    assert path.read_bytes() == b"new" and not left_by_a_kill.exists()
    with replaced_atomically(path, shared=True) as tmp:   # a file several processes may write
        assert str(os.getpid()) in tmp.name
        tmp.write_bytes(b"mine")
    assert path.read_bytes() == b"mine"


def test_a_file_url_is_a_local_folder_and_other_urls_are_kept_as_given(tmp_path):
    from conftest import write_synthetic_store
    from pipeline.info import describe
    from pipeline.storage import Location, is_remote, resolved

    store = write_synthetic_store(tmp_path / "s.zarr", n_rows=512, chunk_rows=256)
    url = f"file://{store}"
    assert not is_remote(url) and Location(url).root == store and not Location(url).remote
    assert resolved(url) == str(store.resolve()) and resolved("s3://bucket/l8.zarr/") == "s3://bucket/l8.zarr"
    assert describe(url).splitlines()[0].startswith(f"store      {store}")
    assert sorted(Location(url).names()) == sorted(p.name for p in store.iterdir())
