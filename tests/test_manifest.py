"""Strict manifest parsing: everything a broken or hostile mirror could send is refused."""

from __future__ import annotations

import json

import pytest

from mirror import layout
from mirror.manifest import (
    DEFAULT_MAX_FILE_SIZE,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    SizeLimits,
    channel_bytes,
    parse_channel,
    validate_name,
    validate_path,
)

pytestmark = pytest.mark.unit

SHA = "ab" * 32


def doc(files=None, **top) -> dict:
    base = {
        "schema": 1,
        "name": "joe",
        "version": "1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "files": files if files is not None else [{"path": "model.safetensors", "size": 10, "sha256": SHA}],
    }
    base.update(top)
    return base


def parse(d: dict) -> Manifest:
    return Manifest.parse(json.dumps(d).encode())


def entry(path="a.bin", size=1, sha256=SHA, **extra) -> dict:
    return {"path": path, "size": size, "sha256": sha256, **extra}


def test_round_trip_is_canonical() -> None:
    m = Manifest.build("joe", "1.0", [FileEntry("b/c.bin", 3, SHA), FileEntry("a.json", 0, "cd" * 32)])
    assert [f.path for f in m.files] == ["a.json", "b/c.bin"]  # sorted: canonical order
    again = Manifest.parse(m.to_bytes())
    assert again == m
    assert again.to_bytes() == m.to_bytes()
    assert m.total_size == 3
    assert m.file("b/c.bin").size == 3


@pytest.mark.parametrize(
    "path, message",
    [
        ("/etc/passwd", "absolute"),
        ("../escape.bin", "'..'"),
        ("a/../../escape.bin", "'..'"),
        ("a/..", "'..'"),
        ("a/./b.bin", "not normalized"),
        ("a//b.bin", "not normalized"),
        ("a/b/", "not normalized"),
        (".", "not normalized"),
        ("a\\b.bin", "backslash"),
        ("a\x00b", "NUL"),
        ("", "non-empty"),
        (MANIFEST_NAME, "reserved"),
        (SIGNATURE_NAME, "reserved"),
        ("COMPLETE", "reserved"),
    ],
)
def test_unsafe_paths_are_rejected(path: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        validate_path(path)
    with pytest.raises(ManifestError, match=message):
        parse(doc([entry(path)]))


def test_non_string_path_is_rejected() -> None:
    with pytest.raises(ManifestError, match="non-empty string"):
        parse(doc([entry(42)]))


def test_reserved_name_is_fine_in_a_subdirectory() -> None:
    assert validate_path("sub/manifest.json") == "sub/manifest.json"


def test_duplicate_paths_are_rejected() -> None:
    with pytest.raises(ManifestError, match="duplicate"):
        parse(doc([entry("a.bin"), entry("a.bin", size=2)]))


def test_file_inside_a_file_is_rejected() -> None:
    with pytest.raises(ManifestError, match="itself a file"):
        parse(doc([entry("a"), entry("a/b/c.bin")]))


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, None, 123, ""])
def test_bad_hash_is_rejected(digest) -> None:
    with pytest.raises(ManifestError, match="sha256"):
        parse(doc([entry(sha256=digest)]))


@pytest.mark.parametrize("size", [-1, True, False, 1.5, "10", None])
def test_bad_size_is_rejected(size) -> None:
    with pytest.raises(ManifestError, match="size"):
        parse(doc([entry(size=size)]))


def test_zero_size_is_allowed() -> None:
    assert parse(doc([entry(size=0)])).files[0].size == 0


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ManifestError, match="unknown keys"):
        parse(doc(extra="x"))
    with pytest.raises(ManifestError, match="unknown keys"):
        parse(doc([entry(mode=0o755)]))


@pytest.mark.parametrize("schema", [0, 3, "1", "2", None, True])
def test_wrong_schema_is_rejected(schema) -> None:
    with pytest.raises(ManifestError, match="schema"):
        parse(doc(schema=schema))


BTIH = "0123456789abcdef0123456789abcdef01234567"


def test_info_hashes_make_a_schema_2_manifest_and_round_trip() -> None:
    with_torrent = Manifest.build("joe", "1.0", [FileEntry("a.bin", 3, SHA, btih=BTIH), FileEntry("e", 0, SHA)])
    raw = json.loads(with_torrent.to_bytes())
    assert raw["schema"] == 2 and raw["files"][0]["btih"] == BTIH and "btih" not in raw["files"][1]
    assert Manifest.parse(with_torrent.to_bytes()) == with_torrent
    # Without any info-hash the manifest stays schema 1: provisioners that predate
    # peer-to-peer read it exactly as before.
    plain = Manifest.build("joe", "1.0", [FileEntry("a.bin", 3, SHA)])
    assert json.loads(plain.to_bytes())["schema"] == 1


@pytest.mark.parametrize("btih, schema, message", [
    (BTIH, 1, "unknown keys"),  # schema 1 has no info-hashes
    (BTIH.upper(), 2, "btih must be 40 lowercase hex"),
    (BTIH[:-1], 2, "btih must be 40 lowercase hex"),
    (12, 2, "btih must be 40 lowercase hex"),
])
def test_bad_info_hashes_are_refused_naming_the_file(btih, schema, message) -> None:
    with pytest.raises(ManifestError, match=message) as err:
        parse(doc([entry("model.bin", btih=btih)], schema=schema))
    assert "files[0]" in str(err.value)


def test_an_empty_file_has_no_info_hash() -> None:
    with pytest.raises(ManifestError, match="empty file cannot have a torrent"):
        parse(doc([entry("empty.bin", size=0, btih=BTIH)], schema=2))


def test_missing_schema_is_rejected() -> None:
    d = doc()
    del d["schema"]
    with pytest.raises(ManifestError, match="schema"):
        parse(d)


@pytest.mark.parametrize("files", [[], None, {"a": 1}, "a.bin"])
def test_files_must_be_a_non_empty_list(files) -> None:
    d = doc()
    d["files"] = files
    with pytest.raises(ManifestError, match="files"):
        parse(d)


def test_entry_must_be_an_object() -> None:
    with pytest.raises(ManifestError, match="must be an object"):
        parse(doc(["a.bin"]))


@pytest.mark.parametrize("field, value", [("name", "../joe"), ("name", ""), ("version", "1/0"), ("version", None)])
def test_bad_name_or_version_is_rejected(field, value) -> None:
    with pytest.raises(ManifestError, match="invalid"):
        parse(doc(**{field: value}))


def test_non_utf8_is_rejected() -> None:
    raw = json.dumps(doc()).encode().replace(b"joe", b"jo\xff")
    with pytest.raises(ManifestError, match="UTF-8"):
        Manifest.parse(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'"manifest"'])
def test_not_a_json_object_is_rejected(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.parse(raw)


def test_oversized_manifest_is_rejected_before_parsing() -> None:
    with pytest.raises(ManifestError, match="limit"):
        Manifest.parse(b" " * (MAX_MANIFEST_BYTES + 1))


def test_created_must_be_a_string() -> None:
    with pytest.raises(ManifestError, match="created"):
        parse(doc(created=5))


@pytest.mark.parametrize("name", ["joe", "en_US-joe-medium", "1.0.0", "v2"])
def test_plain_names_are_accepted(name: str) -> None:
    assert validate_name(name, "model name") == name


@pytest.mark.parametrize("name", ["", ".", "..", "-x", ".hidden", "a/b", "a b", "x" * 129, None, 3])
def test_bad_names_are_rejected(name) -> None:
    with pytest.raises(ManifestError):
        validate_name(name, "model name")


def test_channel_round_trip() -> None:
    assert parse_channel(channel_bytes("1.2.0")) == "1.2.0"


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[]", b'{"v": "1"}', b'{"version": "../1"}', b'{"version": 3}', b"\xff\xfe"]
)
def test_bad_channel_files_are_rejected(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        parse_channel(raw)


def test_channel_bytes_validates_the_version() -> None:
    with pytest.raises(ManifestError):
        channel_bytes("../1")


def test_layout_keys() -> None:
    assert layout.object_key("joe", "1.0", "sub/a.bin") == "models/joe/1.0/sub/a.bin"
    assert layout.manifest_key("joe", "1.0") == "models/joe/1.0/manifest.json"
    assert layout.signature_key("joe", "1.0") == "models/joe/1.0/manifest.json.sig"
    assert layout.channel_key("joe", "stable") == "channels/joe/stable.json"
    with pytest.raises(ManifestError):
        layout.object_key("joe", "1.0", "../x")
    with pytest.raises(ManifestError):
        layout.channel_key("joe", "../stable")


def test_default_size_limits_refuse_sizes_no_model_has() -> None:
    # The chaos run's values: 2^63-1 and 10^20 bytes passed the parser before.
    for size in (2**63 - 1, 10**20, DEFAULT_MAX_FILE_SIZE + 1):
        with pytest.raises(ManifestError, match=r"files\[1\] \(b.bin\): size .* over .*max_file_size"):
            parse(doc([entry("a.bin"), entry("b.bin", size=size)]))
    assert parse(doc([entry(size=DEFAULT_MAX_FILE_SIZE)])).files[0].size == DEFAULT_MAX_FILE_SIZE


def test_model_size_limit_names_the_entry_that_crosses_it() -> None:
    limits = SizeLimits(max_file_size=100, max_model_size=250)
    files = [entry("a.bin", size=100), entry("b.bin", size=100), entry("c.bin", size=100)]
    with pytest.raises(ManifestError, match=r"files\[2\] \(c.bin\): .* 300 bytes, over the 250 .*max_model_size"):
        Manifest.parse(json.dumps(doc(files)).encode(), limits)
    assert len(Manifest.parse(json.dumps(doc(files[:2])).encode(), limits).files) == 2
    with pytest.raises(ManifestError, match="max_file_size"):
        Manifest.parse(json.dumps(doc([entry(size=101)])).encode(), limits)
    # Default limits: 1 TiB per model, even when each file is within its own limit.
    big = [entry(f"f{i}.bin", size=DEFAULT_MAX_FILE_SIZE) for i in range(5)]
    with pytest.raises(ManifestError, match=r"files\[4\] \(f4.bin\).*max_model_size"):
        parse(doc(big))
    # A kept snapshot's manifest (accepted before) is read without limits.
    assert len(Manifest.parse(json.dumps(doc(big)).encode(), limits=None).files) == 5
