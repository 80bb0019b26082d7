"""Torrents written by `tts-mirror publish` (against both S3 servers of the matrix).

The info-hash expected here is computed independently, by torf's own `generate()` over
the local file; the publisher builds its torrent from piece hashes taken during its
single sha256 read, so agreement means both paths describe the same bytes.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torf
from click.testing import CliRunner

from mirror import layout
from mirror import torrents as bt
from mirror.catalog import verify_version
from mirror.cli import main
from mirror.manifest import Manifest
from mirror.publish import publish_dir
from mirror.remote import Mirror
from mirror.signing import generate_keypair

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def key(tmp_path: Path) -> Path:
    generate_keypair(tmp_path / "sign.key", tmp_path / "sign.pub")
    return tmp_path / "sign.key"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"sample_rate": 22050}\n')  # smaller than one piece
    (d / "sub" / "weights.bin").write_bytes(os.urandom(3 * MiB + 17))  # 4 pieces, the last short
    (d / "exact.bin").write_bytes(os.urandom(2 * MiB))  # piece-aligned
    (d / "empty.txt").write_bytes(b"")  # no torrent: BitTorrent needs a byte
    return d


def connect(s3_server, bucket) -> Mirror:
    return Mirror.connect(s3_server.endpoint, bucket, s3_server.credentials)


def reference_btih(path: Path, sha256: str) -> str:
    torrent = torf.Torrent(path, name=sha256, piece_size=bt.PIECE_SIZE, created_by=None, creation_date=None)
    torrent.generate()
    return torrent.infohash


def published(mirror: Mirror, version: str = "1.0") -> Manifest:
    found = mirror.manifest("joe", version)
    assert found is not None
    return found[0]


def test_publish_writes_one_torrent_per_file_and_signs_its_info_hash(s3_server, bucket, key, model) -> None:
    mirror = connect(s3_server, bucket)
    report = publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key)
    manifest = published(mirror)
    assert json.loads(mirror.read(layout.manifest_key("joe", "1.0")))["schema"] == 2
    by_path = {f.path: f for f in manifest.files}
    assert by_path["empty.txt"].btih is None
    assert report.torrents_written == 3
    for path in ("config.json", "sub/weights.bin", "exact.bin"):
        entry = by_path[path]
        assert entry.btih == reference_btih(model / path, entry.sha256), path
        data = mirror.read(layout.torrent_key(entry.sha256))
        assert bt.check(data, btih=entry.btih, sha256=entry.sha256, size=entry.size) == data
        meta = torf.Torrent.read_stream(io.BytesIO(data)).metainfo
        # Nothing but the info dictionary: no tracker, no web seed (a presigned URL
        # would expire inside it), no creation date or private flag to vary the hash.
        assert set(meta) == {"info"}, meta.keys()
        assert set(meta["info"]) == {"name", "length", "piece length", "pieces"}
    assert verify_version(mirror, "joe", "1.0").mismatches == []


def test_versions_sharing_a_file_share_its_torrent(s3_server, bucket, key, model) -> None:
    mirror = connect(s3_server, bucket)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key)
    (model / "config.json").write_text('{"sample_rate": 16000}\n')
    report = publish_dir(model, name="joe", version="1.1", mirror=mirror, signing_key=key)
    assert report.torrents_written == 1  # only the changed config's
    old, new = ({f.path: f.btih for f in published(mirror, v).files} for v in ("1.0", "1.1"))
    assert old["sub/weights.bin"] == new["sub/weights.bin"]
    assert old["config.json"] != new["config.json"]
    listing = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=layout.TORRENTS_PREFIX)
    assert len(listing["Contents"]) == 4


def test_no_torrents_writes_a_schema_1_manifest(s3_server, bucket, key, model) -> None:
    mirror = connect(s3_server, bucket)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key, torrents=False)
    assert json.loads(mirror.read(layout.manifest_key("joe", "1.0")))["schema"] == 1
    assert all(f.btih is None for f in published(mirror).files)
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=layout.TORRENTS_PREFIX)


def test_republish_restores_a_lost_torrent(s3_server, bucket, key, model) -> None:
    mirror = connect(s3_server, bucket)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key)
    entry = published(mirror).file("sub/weights.bin")
    s3_server.client().delete_object(Bucket=bucket, Key=layout.torrent_key(entry.sha256))
    problems = verify_version(mirror, "joe", "1.0").mismatches
    assert problems == [f"sub/weights.bin: its torrent {layout.torrent_key(entry.sha256)} is missing on the mirror"]
    report = publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key)
    assert report.unchanged and report.torrents_written == 1
    assert verify_version(mirror, "joe", "1.0").mismatches == []


def test_a_swapped_torrent_is_refused(s3_server, bucket, key, model) -> None:
    mirror = connect(s3_server, bucket)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key)
    files = {f.path: f for f in published(mirror).files}
    weights, config = files["sub/weights.bin"], files["config.json"]
    other = mirror.read(layout.torrent_key(config.sha256))
    # The mirror serves another file's (valid) torrent under this file's key.
    mirror.put(layout.torrent_key(weights.sha256), other, "application/x-bittorrent")
    with pytest.raises(bt.TorrentError, match=f"the manifest signed {weights.btih}"):
        bt.check(other, btih=weights.btih, sha256=weights.sha256, size=weights.size)
    problems = verify_version(mirror, "joe", "1.0").mismatches
    assert len(problems) == 1 and problems[0].startswith("sub/weights.bin: torrent for")
    with pytest.raises(bt.TorrentError, match="cannot be read"):
        bt.check(b"not bencoded", btih=weights.btih, sha256=weights.sha256, size=weights.size)


def test_tracker_whitelist_lists_every_published_info_hash(s3_server, bucket, key, model, tmp_path) -> None:
    mirror = connect(s3_server, bucket)
    publish_dir(model, name="joe", version="1.0", mirror=mirror, signing_key=key)
    publish_dir(model, name="ann", version="2.0", mirror=mirror, signing_key=key, torrents=False)
    expected = sorted({f.btih for f in published(mirror).files if f.btih})
    out = tmp_path / "whitelist"
    creds = s3_server.write_credentials(tmp_path / "creds.toml")
    env = {"TTS_MIRROR_ENDPOINT": s3_server.endpoint, "TTS_MIRROR_BUCKET": bucket,
           "TTS_MIRROR_CREDENTIALS": str(creds)}
    result = CliRunner().invoke(main, ["tracker-whitelist", "--out", str(out)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines() == expected and len(expected) == 3
    assert "3 info-hash(es) written" in result.output
    stdout = CliRunner().invoke(main, ["tracker-whitelist"], env=env, catch_exceptions=False)
    assert stdout.output.splitlines() == expected


def test_piece_hasher_matches_whole_pieces_fed_in_odd_chunks() -> None:
    data = os.urandom(bt.PIECE_SIZE * 2 + 5)
    hasher = bt.PieceHasher()
    for start in range(0, len(data), 777_777):  # chunks that straddle piece boundaries
        hasher.update(data[start:start + 777_777])
    import hashlib

    expected = b"".join(hashlib.sha1(data[i:i + bt.PIECE_SIZE]).digest() for i in range(0, len(data), bt.PIECE_SIZE))
    assert hasher.pieces() == expected and len(expected) == 3 * 20
