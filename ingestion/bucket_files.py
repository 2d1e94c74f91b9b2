"""Bucket sources of the Dask ingest: ``ecgplat ingest CORPUS s3://bucket/prefix/``, where every
worker reads the records' files from object storage itself (no shared filesystem, no
``--send-bytes``).

The driver lists the prefix once (``BucketSource.listing``): the record paths are what the corpus
reader's own ``list_records`` gives over a skeleton of the listing (an empty file for every
``.hea``, ``.npy`` and ``.npz`` object, and ``ptbxl_database.csv``) laid out in a
``sent_files.record_folder``, and the reader's ``check_corpus`` runs over the same skeleton with
the first and last headers fetched (64 KiB at most each), so the records, and the refusal of
another corpus's bucket, are those of a local folder holding the same objects.

A task carries the URL, the record paths, the store's key and the read options, never a
credential. On the worker, ``process_bucket_batch`` opens the bucket with the standard AWS
variables and config files of its own environment, gets each record's files by
``sent_files.record_payload`` from the bucket (the header first, at most ``MAX_HEADER_BYTES``; then
the readers' header checks of rate, duration and data-file sizes; then the data files it names,
each read only when its size is the one the header implies, or only their sizes where a check
fails), lays them out in a private, locked ``record_folder`` and runs the unchanged reader there
(``sent_files.process_laid_out``), so rejects and reasons equal a local ingest's. Folders of
killed workers are removed by ``sent_files.sweep_orphans``, as send-bytes' are.

Corpora: those whose record is a header and the files it names (``BUCKET_CORPORA``: wfdb,
cinc2021, ludb, cpsc2021); others are refused before anything is listed. Object stores hold no
symbolic links and no ``..`` keys: a key that is not a plain relative path below the prefix
(``a//b``, ``../x``) is not listed.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from pathlib import Path

from ecgplat import faults
from ingestion.readers.options import ReadOptions
from ingestion.readers.protocol import Reader, check_corpus
from ingestion.readers.record import RecordError
from ingestion.readers.wfdb_header import MAX_HEADER_BYTES
from ingestion.sent_files import (
    SEND_BYTES_CORPORA,
    materialise,
    process_laid_out,
    record_folder,
    record_payload,
)
from ingestion.worker import reject_row

BUCKET_CORPORA = SEND_BYTES_CORPORA  # record = .hea + the files it names
_SKELETON_SUFFIXES = (".hea", ".npy", ".npz")  # what list_records and check_corpus look for
_SKELETON_ROOT_FILES = ("ptbxl_database.csv",)
_PROBE_BYTES = 1 << 16  # of a header read by check_corpus (ingestion.readers.recognise)


def _open(url: str):
    """(fsspec filesystem, root key without trailing ``/``) of ``url``; credentials and endpoint
    come from this process's environment (for S3: ``AWS_*`` variables, ``~/.aws``)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except ImportError:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"{url}: install the fsspec package for {scheme}:// (s3fs)") from None
    return fs, root.rstrip("/")


class _BucketFile:
    """One object (``sent_files.RecordFile``): ``stat`` asks its size, ``read_bytes`` reads at
    most that many bytes (an object replaced in between cannot make it read more)."""

    def __init__(self, fs, key: str):
        self.fs, self.key = fs, key
        self.size: int | None = None

    def stat(self) -> os.stat_result:
        size = int(self.fs.size(self.key))  # FileNotFoundError: missing
        self.size = size
        return os.stat_result((stat.S_IFREG | 0o400, 0, 0, 1, 0, 0, size, 0, 0, 0))

    def read_bytes(self) -> bytes:
        size = self.stat().st_size if self.size is None else self.size
        return bytes(self.fs.cat_file(self.key, start=0, end=size)) if size else b""


class _BucketTree:
    """The objects below a prefix (``sent_files.FileTree``). Names the path policy refuses
    (absolute, ``..``) are not fetched; the reader refuses them on the worker with its reason."""

    def __init__(self, url: str):
        self.fs, self.root = _open(url)

    def header(self, rel: str, opts: ReadOptions | None) -> _BucketFile:
        return _BucketFile(self.fs, f"{self.root}/{rel}.hea")

    def data(self, rel: str, name: str, opts: ReadOptions | None) -> _BucketFile:
        rel_file = posixpath.normpath(posixpath.join(posixpath.dirname(rel), name))
        if os.path.isabs(name) or name.startswith("~") or rel_file.split("/")[0] == "..":
            raise RecordError(rel, "refused: file path outside SRC")
        return _BucketFile(self.fs, f"{self.root}/{rel_file}")

    def refused(self, rel_file: str) -> None:
        return None  # no symbolic links in a bucket


def _listed_keys(fs, root: str, url: str) -> list[str]:
    """Relative keys of every object below ``root``; one-line errors naming ``url``."""
    try:
        keys = fs.find(root)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: the bucket does not exist") from None
    except PermissionError:
        raise PermissionError(
            f"{url}: access denied (credentials: the AWS variables or config of this machine)"
        ) from None
    except Exception as e:  # noqa: BLE001 - botocore's own errors (bad name, endpoint, ...)
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{url}: cannot list the bucket ({type(e).__name__}: {first})") from None
    rels = [k[len(root) + 1 :] for k in keys if k.startswith(f"{root}/")]
    rels = [r for r in rels if r and posixpath.normpath(r) == r and r.split("/")[0] != ".."]
    if not rels:
        raise FileNotFoundError(f"{url}: no objects under this prefix")
    return rels


class BucketSource:
    """SRC as an fsspec URL (``s3://bucket/prefix/``) on the driver: checks, listing, tasks."""

    def __init__(self, corpus: str, url: str, send_bytes: bool = False):
        if corpus not in BUCKET_CORPORA:
            raise ValueError(
                f"{url}: ingesting from object storage reads {', '.join(BUCKET_CORPORA)} "
                f"records (a header and the files it names), not {corpus!r}; copy the bucket "
                "to a local folder first"
            )
        if send_bytes:
            raise ValueError(
                f"{url}: --send-bytes is for a local SRC; workers read a bucket themselves "
                "(drop --send-bytes)"
            )
        self.url = url

    def listing(self, reader: Reader) -> list[str]:
        """``reader.list_records`` of the bucket, after ``check_corpus`` (module docstring)."""
        fs, root = _open(self.url)
        keys = _listed_keys(fs, root, self.url)
        with record_folder() as skeleton:
            for rel in keys:
                if rel.endswith(_SKELETON_SUFFIXES) or rel in _SKELETON_ROOT_FILES:
                    with contextlib.suppress(OSError):  # a key that is also a "folder"
                        (skeleton / rel).parent.mkdir(parents=True, exist_ok=True)
                        (skeleton / rel).touch()
            listing = reader.list_records(skeleton)
            for rel in dict.fromkeys(listing[:1] + listing[-1:]):
                with contextlib.suppress(OSError):  # unreadable: no evidence, as locally
                    data = fs.cat_file(f"{root}/{rel}.hea", start=0, end=_PROBE_BYTES)
                    (skeleton / f"{rel}.hea").write_bytes(data)
            try:
                check_corpus(reader, skeleton, listing)
            except ValueError as e:
                raise ValueError(str(e).replace(str(skeleton), self.url.rstrip("/"))) from None
        return listing

    def task(self, corpus: str, rels: list[str], seq: int, secret: bytes, opts) -> tuple:
        """(function, arguments) of the Dask task of ``rels``: the URL, no file, no credential."""
        return process_bucket_batch, (corpus, self.url, rels, seq, secret, opts)

    def reject_row(self, reader: Reader, rel: str, reason: str, secret: bytes, opts) -> tuple:
        """``worker.reject_row`` made on the driver (a record whose worker died), redacted by
        the reader's patient hint from the record's header, fetched into a ``record_folder``."""
        hea = _BucketTree(self.url).header(rel, opts)
        with record_folder() as tmp:
            with contextlib.suppress(OSError):
                if hea.stat().st_size <= MAX_HEADER_BYTES:
                    materialise(tmp, {f"{rel}.hea": hea.read_bytes()})
            return reject_row(reader, tmp, rel, reason, secret, opts)


def process_bucket_batch(corpus, url, rels, seq, secret, opts=None):
    """Worker side: lay out the files of ``rels`` fetched from ``url`` (module docstring) and
    run ``ingestion.worker.process_batch`` over them."""
    tree = _BucketTree(url)

    def lay_out(folder: Path) -> None:
        for rel in rels:
            materialise(folder, record_payload(tree, rel, opts))
            faults.stop_point("bucket.laid_out")  # tests: a worker killed holding records

    return process_laid_out(corpus, lay_out, rels, seq, secret, opts)
