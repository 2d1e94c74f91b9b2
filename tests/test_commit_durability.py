"""Batched durability of the segments' shard files: new files are made durable by one sync per
commit, a file that may hold committed chunks is fsynced before it replaces the old one."""

from __future__ import annotations

import os

import pytest

from ecgplat import atomic
from ecgplat import store as S
from ecgplat.store.segment_codec import ShardFiles


@pytest.fixture
def calls(monkeypatch):
    """Counts of os.fsync and of syncfs calls (syncfs answered as available unless told)."""
    seen = {"fsync": 0, "syncfs": 0, "have_syncfs": True}
    real_fsync = os.fsync

    def fsync(fd):
        seen["fsync"] += 1
        real_fsync(fd)

    def syncfs(folder):
        seen["syncfs"] += 1
        return seen["have_syncfs"]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_syncfs", syncfs)
    return seen


def _chunks(n: int, start: int = 0) -> list[bytes]:
    return [f"chunk-{i}".encode() * (i % 5 + 1) for i in range(start, start + n)]


def test_new_shards_cost_one_sync_per_commit(tmp_path, calls):
    per = S.SEGMENT_SHARD
    shards = ShardFiles(tmp_path, 0)
    shards.extend(_chunks(2 * per + 3))
    assert calls["fsync"] == 0 and len(shards.unsynced) == 2  # two full shards, not yet durable
    shards.flush()  # the open shard is a new file too
    assert calls["fsync"] == 0 and len(shards.unsynced) == 3
    shards.sync()
    assert calls["syncfs"] == 1 and shards.unsynced == []
    reread = ShardFiles(tmp_path, 2 * per + 3)
    assert reread._read(0) == _chunks(per) and reread._read(1) == _chunks(per, per)
    assert reread.tail == _chunks(3, 2 * per)


def test_rewriting_a_committed_shard_is_durable_before_the_rename(tmp_path, calls):
    per = S.SEGMENT_SHARD
    first = ShardFiles(tmp_path, 0)
    first.extend(_chunks(3))
    first.flush()
    first.sync()
    again = ShardFiles(tmp_path, 3)  # the next commit reopens the open shard
    again.extend(_chunks(1, 3))
    before = calls["fsync"]
    again.flush()
    assert calls["fsync"] - before == 2  # the file's data, then its folder (the rename)
    assert again.unsynced == []  # nothing left for the commit's sync
    assert ShardFiles(tmp_path, 4).tail == _chunks(4)
    assert per > 4


def test_without_syncfs_each_new_file_and_folder_is_fsynced(tmp_path, calls):
    calls["have_syncfs"] = False
    per = S.SEGMENT_SHARD
    shards = ShardFiles(tmp_path, 0)
    shards.extend(_chunks(2 * per + 1))
    shards.flush()
    shards.sync()
    # 3 files c/k/0/0, their folders c/k/0 and c/k (k = 0, 1, 2), c and segments/ itself
    assert calls["fsync"] == 3 + 6 + 2
