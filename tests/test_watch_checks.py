"""`ecgplat watch` checks every option before it reads a record, and prints its events one line
each: records by their store key, control characters of file names escaped."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hostile_files import write_wfdb
from typer.testing import CliRunner

from ecgplat.cli import app
from ingestion.watch import Watcher

REPO = Path(__file__).parents[1]
CKPT = REPO / "tests" / "fixtures" / "pretrained_tiny" / "w2v_cmsc_rlm_tiny_synth.pt"
runner = CliRunner()


@pytest.fixture
def inbox(tmp_path) -> Path:
    """A folder holding one complete WFDB record."""
    write_wfdb(tmp_path / "inbox", "r1", n_sig=12)
    return tmp_path / "inbox"


def _foreign_index(tmp_path: Path) -> Path:
    from retrieval.index import build_index

    return build_index(np.eye(2, 4, dtype=np.float32), ["a", "b"]).save(tmp_path / "foreign")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--leads", "I,XX"], ["--leads", "XX"]),
        (["--embed", "a/b", "--checkpoint", str(CKPT)], ["bad feature set name", "a/b"]),
        (["--embed", "e", "--checkpoint", str(CKPT), "--leads", "bogus"], ["--leads", "bogus"]),
        (["--embed", "e", "--checkpoint", str(CKPT), "--index", "FOREIGN"], ["record-level"]),
    ],
    ids=["leads", "embed-name", "leads-with-embed", "index"],
)
def test_options_are_checked_before_any_record_is_read(inbox, tmp_path, extra, fragments):
    """The bug: the first record was ingested and committed, then the option refused."""
    store = tmp_path / "store"
    extra = [str(_foreign_index(tmp_path)) if a == "FOREIGN" else a for a in extra]
    args = ["watch", str(inbox), "--store", str(store), "--poll", "0.05", "--max-seconds", "3"]
    r = runner.invoke(app, [*args, *extra, "--device", "cpu"], env={"ECGPLAT_DEBUG": None})
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in r.stderr
    assert not store.exists()  # nothing read, nothing stored


def test_watcher_refuses_a_bad_poll_before_reading(inbox, tmp_path):
    with pytest.raises(ValueError, match="poll must be > 0"):
        Watcher("wfdb", inbox, tmp_path / "s", poll=0)


def test_events_are_one_line_each_with_control_characters_escaped(tmp_path):
    """A good record whose name holds an escape sequence, and a bad one whose name holds a
    newline followed by a forged event: each event stays one line, the names escaped."""
    inbox = tmp_path / "inbox"
    write_wfdb(inbox, "ok\x1b[31mred", n_sig=12)
    (inbox / "bad\nqueryable forged 0.00 s.hea").write_text("not a header\n")
    lines: list[str] = []
    watcher = Watcher("wfdb", inbox, tmp_path / "store", poll=0.05, echo=lines.append)
    watcher.catch_up()
    watcher.run(threading.Event(), max_seconds=1.0)
    assert lines, "no event"
    for line in lines:
        assert "\n" not in line and "\x1b" not in line, repr(line)
    assert any(line.startswith("queryable wfdb/ok\\x1b[31mred ") for line in lines), lines
    rejected = [line for line in lines if line.startswith("rejected ")]
    assert len(rejected) == 1, lines
    assert rejected[0].startswith("rejected wfdb/bad\\nqueryable forged 0.00 s: "), lines
