"""The same behaviour from both blob stores: a local directory and GCS (on the emulator)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from transcription.blobstore import BlobNotFound, BlobStore, LocalBlobStore, open_blob_store

KEY = "jobs/tr_abc/audio.mp3"


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return open_blob_store((tmp_path / "blobs").as_uri())
    return open_blob_store(request.getfixturevalue("gcs_bucket_url"))


def _write_generated_file(path: Path, size: int) -> str:
    """Write ``size`` pseudo-random bytes to ``path`` a block at a time, readable by others (so
    a local store copies it rather than hard-linking it); return their SHA-256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)
    with path.open("wb") as f:
        for counter in range(-(-size // len(block))):
            chunk = (counter.to_bytes(8, "big") + block)[: min(len(block), size - f.tell())]
            digest.update(chunk)
            f.write(chunk)
    path.chmod(0o644)
    return digest.hexdigest()


def _sha256_of(store: BlobStore, key: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    with store.open(key) as f:
        while piece := f.read(1024 * 1024):
            digest.update(piece)
            total += len(piece)
    return digest.hexdigest(), total


def test_is_a_blob_store(store: BlobStore) -> None:
    assert isinstance(store, BlobStore)


def test_put_bytes_round_trip(store: BlobStore) -> None:
    uri = store.put_bytes(KEY, b"ID3 audio bytes", content_type="audio/mpeg")
    assert uri == store.uri(KEY)
    assert store.get_bytes(KEY) == b"ID3 audio bytes"
    assert store.exists(KEY)
    assert len(store.get_bytes(KEY)) == len(b"ID3 audio bytes")


def test_empty_blob_round_trip(store: BlobStore, tmp_path: Path) -> None:
    store.put_bytes("empty.txt", b"")
    assert store.exists("empty.txt")
    assert store.get_bytes("empty.txt") == b""
    with store.open("empty.txt") as f:
        assert f.read() == b""
    store.download("empty.txt", tmp_path / "empty.txt")
    assert (tmp_path / "empty.txt").read_bytes() == b""


def test_put_file_and_download_round_trip(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "in.mp3"
    data = os.urandom(300_000)
    src.write_bytes(data)
    assert store.put_file(KEY, src) == store.uri(KEY)
    dest = tmp_path / "out.mp3"
    dest.write_bytes(b"stale")
    store.download(KEY, dest)
    assert dest.read_bytes() == data


def test_put_file_of_50_mb_stays_in_bounded_memory(store: BlobStore, tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    src = tmp_path / "big.mp3"
    sha256 = _write_generated_file(src, size)
    tracemalloc.start()
    try:
        store.put_file(KEY, src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 3, f"peak Python allocation {peak / 2**20:.1f} MiB"
    assert _sha256_of(store, KEY) == (sha256, size)


def test_open_reads_in_pieces(store: BlobStore) -> None:
    data = bytes(range(256)) * 1000
    store.put_bytes(KEY, data)
    with store.open(KEY) as f:
        assert f.read(10) == data[:10]
        assert f.read(1000) == data[10:1010]
        assert f.read() == data[1010:]
        assert f.read(10) == b""


def test_overwrite_replaces_content(store: BlobStore) -> None:
    store.put_bytes(KEY, b"a much longer first version")
    store.put_bytes(KEY, b"short")
    assert store.get_bytes(KEY) == b"short"
    assert len(store.get_bytes(KEY)) == 5
    assert store.list("jobs") == [KEY]


def test_delete_is_idempotent(store: BlobStore) -> None:
    store.put_bytes(KEY, b"x")
    store.delete(KEY)
    assert not store.exists(KEY)
    store.delete(KEY)
    store.delete("never/written.txt")


def test_list_is_sorted_and_directory_like(store: BlobStore) -> None:
    keys = ["jobs/a/2.txt", "jobs/a/1.txt", "jobs/a/sub/3.txt", "jobs/ab/4.txt", "other.txt"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list("jobs/a") == ["jobs/a/1.txt", "jobs/a/2.txt", "jobs/a/sub/3.txt"]
    assert store.list("jobs/a/") == store.list("jobs/a")
    assert store.list("") == sorted(keys)
    assert store.list("jobs/missing") == []
    assert store.list("jobs/a/1.txt") == []


def test_delete_prefix(store: BlobStore) -> None:
    for key in ["jobs/a/1.txt", "jobs/a/sub/2.txt", "jobs/ab/3.txt", "other.txt"]:
        store.put_bytes(key, b"x")
    assert store.delete_prefix("jobs/a") == 2
    assert store.list("") == ["jobs/ab/3.txt", "other.txt"]
    assert store.delete_prefix("jobs/a") == 0
    assert store.delete_prefix("") == 2
    assert store.list("") == []
    store.put_bytes("jobs/a/again.txt", b"y")
    assert store.get_bytes("jobs/a/again.txt") == b"y"


def test_missing_key_raises_blob_not_found(store: BlobStore, tmp_path: Path) -> None:
    missing = "jobs/tr_missing/audio.mp3"
    dest = tmp_path / "dest.mp3"
    for call in (
        lambda: store.open(missing),
        lambda: store.get_bytes(missing),
        lambda: store.download(missing, dest),
    ):
        with pytest.raises(BlobNotFound) as info:
            call()
        assert isinstance(info.value, KeyError)
        assert info.value.key == missing
        assert store.uri(missing) in str(info.value)
    assert not store.exists(missing)
    assert [p.name for p in tmp_path.iterdir() if p.name != "blobs"] == []


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../escape", "jobs/../../escape", "a//b", "./a", "a/", "a\\..\\b"]
)
def test_keys_that_escape_the_root_are_rejected(store: BlobStore, key: str) -> None:
    for call in (
        lambda: store.uri(key),
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.local_path(key),
    ):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("prefix", ["/", "../up", "a/../.."])
def test_prefixes_that_escape_the_root_are_rejected(store: BlobStore, prefix: str) -> None:
    with pytest.raises(ValueError):
        store.list(prefix)
    with pytest.raises(ValueError):
        store.delete_prefix(prefix)


def test_concurrent_use_from_threads(store: BlobStore) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(5):
                key = f"jobs/t{n}/{i}.txt"
                store.put_bytes(key, f"{n}-{i}".encode() * 100)
                assert store.get_bytes(key) == f"{n}-{i}".encode() * 100
                store.put_bytes("shared.txt", f"{n}-{i}".encode() * 100)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list("jobs")) == 30
    shared = store.get_bytes("shared.txt")
    assert shared == shared[: len(shared) // 100] * 100


# Local-only behaviour.


def test_local_uri_and_local_path(tmp_path: Path) -> None:
    store = open_blob_store(str(tmp_path / "blobs"))
    store.put_bytes(KEY, b"x")
    path = store.local_path(KEY)
    assert path == (tmp_path / "blobs" / KEY).resolve()
    assert store.uri(KEY) == path.as_uri()
    assert store.uri(KEY).startswith("file:///")
    assert Path(unquote(urlsplit(store.uri(KEY)).path)).read_bytes() == b"x"


def test_local_writes_are_private(tmp_path: Path) -> None:
    store = open_blob_store(str(tmp_path / "blobs"))
    store.put_bytes(KEY, b"x")
    for directory in ["blobs", "blobs/jobs", "blobs/jobs/tr_abc"]:
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "blobs" / KEY).stat().st_mode) == 0o600


class FailingReader(io.RawIOBase):
    """Yields some bytes, then fails the way a disk that goes bad mid-read does."""

    def __init__(self) -> None:
        self.sent = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.sent:
            raise OSError(errno.EIO, "Input/output error")
        self.sent = True
        buffer[:5] = b"part-"
        return 5


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "blobs"
    store = open_blob_store(str(root))
    store.put_bytes(KEY, b"complete transcript")
    with pytest.raises(FileNotFoundError):
        store.put_file(KEY, tmp_path / "no-such-file")

    # A readable-by-others source is copied, not linked; make its read fail halfway.
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"part-of-a-new-version")
    bad.chmod(0o644)
    real_open = Path.open

    def open_failing(self: Path, *args: Any, **kwargs: Any) -> Any:
        return FailingReader() if self == bad else real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_failing)
    with pytest.raises(OSError, match="Input/output error"):
        store.put_file(KEY, bad)
    monkeypatch.undo()

    assert store.get_bytes(KEY) == b"complete transcript"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [KEY]
    assert store.list("") == [KEY]


def test_local_download_is_atomic(tmp_path: Path) -> None:
    store = open_blob_store(str(tmp_path / "blobs"))
    dest = tmp_path / "out" / "audio.mp3"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    with pytest.raises(BlobNotFound):
        store.download("missing.mp3", dest)
    assert dest.read_bytes() == b"previous"
    assert list(dest.parent.iterdir()) == [dest]


def test_local_delete_prefix_prunes_empty_directories(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = open_blob_store(str(root))
    store.put_bytes("jobs/a/sub/1.txt", b"x")
    store.put_bytes("jobs/b/2.txt", b"x")
    store.delete_prefix("jobs/a")
    assert not (root / "jobs" / "a").exists()
    assert (root / "jobs" / "b" / "2.txt").exists()
    store.delete_prefix("")
    assert root.is_dir()
    assert list(root.iterdir()) == []


# GCS-only behaviour.


def test_gcs_uri_content_type_and_no_local_path(gcs_bucket_url: str) -> None:
    from google.cloud import storage

    store = open_blob_store(gcs_bucket_url)
    bucket = urlsplit(gcs_bucket_url).netloc
    assert store.uri(KEY) == f"gs://{bucket}/store/{KEY}"
    assert store.put_bytes(KEY, b"x") == f"gs://{bucket}/store/{KEY}"
    store.put_bytes("jobs/tr_abc/transcript.srt", b"1", content_type="application/x-subrip")
    assert store.local_path(KEY) is None

    client = storage.Client.create_anonymous_client()
    blobs = {b.name: b.content_type for b in client.list_blobs(bucket)}
    assert blobs == {
        f"store/{KEY}": "audio/mpeg",
        "store/jobs/tr_abc/transcript.srt": "application/x-subrip",
    }


def test_gcs_store_without_prefix(gcs_bucket_url: str) -> None:
    bucket = urlsplit(gcs_bucket_url).netloc
    store = open_blob_store(f"gs://{bucket}")
    assert store.put_bytes("a.txt", b"x") == f"gs://{bucket}/a.txt"
    prefixed = open_blob_store(f"gs://{bucket}/store/")
    prefixed.put_bytes("b.txt", b"y")
    assert store.list("") == ["a.txt", "store/b.txt"]
    assert prefixed.list("") == ["b.txt"]


# Opening stores by URL.


def test_open_blob_store_local_forms(tmp_path: Path) -> None:
    for url in [str(tmp_path / "a"), (tmp_path / "a").as_uri(), f"file://localhost{tmp_path}/a"]:
        store = open_blob_store(url)
        assert isinstance(store, LocalBlobStore)
        assert store.root == (tmp_path / "a").resolve()
    spaced = open_blob_store((tmp_path / "with space").as_uri())
    assert isinstance(spaced, LocalBlobStore)
    assert spaced.root == (tmp_path / "with space").resolve()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("s3://bucket/prefix", "unsupported"),
        ("http://example.com/x", "unsupported"),
        ("file://remote-host/x", "absolute local path"),
        ("file:relative/dir", "absolute local path"),
        ("gs://", "no bucket"),
        ("gs:bucket", "no bucket"),
        ("gs://bucket/../up", "'..'"),
    ],
)
def test_open_blob_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_blob_store(url)


def test_gcs_library_is_imported_only_for_gs_urls(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from transcription.blobstore import open_blob_store
        open_blob_store({str(tmp_path / "local")!r}).put_bytes("a.txt", b"x")
        assert "google.cloud.storage" not in sys.modules, "imported eagerly"
        sys.modules["google.cloud.storage"] = None  # as if the gcs extra were not installed
        try:
            open_blob_store("gs://bucket/prefix")
        except ImportError as exc:
            assert "google-cloud-storage" in str(exc), exc
        else:
            raise AssertionError("no ImportError")
        """
    )
    subprocess.run(
        [sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[2], timeout=60
    )
