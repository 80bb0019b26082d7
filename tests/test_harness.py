"""The harness itself talks to real S3 servers, and pins down where they differ.

The project must work against every S3 implementation in the matrix (nanio, rclone, a
real MinIO when given). The behaviours below differ between them; each is handled once
in the project (named in the comment) and checked here per server, so a server upgrade
that changes one shows up as a failing test instead of a surprise in production.
"""

import hashlib
import time

import httpx
import pytest

from tts_testkit.s3servers import S3Server

pytestmark = pytest.mark.integration

LOCAL = ("nanio", "rclone")


def test_s3_server_round_trip(s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="a/")["Contents"]]
    assert keys == ["a/b.txt"]


def test_user_metadata_key_case(s3_server: S3Server, bucket: str) -> None:
    # mirror/publish.py::_matches compares metadata keys case-insensitively.
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="m.bin", Body=b"x", Metadata={"sha256": "ab" * 32})
    meta = client.head_object(Bucket=bucket, Key="m.bin")["Metadata"]
    expected = {"nanio": "sha256", "rclone": "Sha256"}.get(s3_server.kind)
    if expected:
        assert list(meta) == [expected]
    assert {k.lower(): v for k, v in meta.items()} == {"sha256": "ab" * 32}


def test_multipart_etag(s3_server: S3Server, bucket: str) -> None:
    # Nothing in the project trusts an ETag as a checksum: the manifest's sha256 is the
    # truth (ARCHITECTURE: MinIO's multipart checksums are not whole-file sha256).
    client = s3_server.client()
    parts = [b"a" * (5 * 1024 * 1024), b"b" * 100]
    up = client.create_multipart_upload(Bucket=bucket, Key="mp.bin")
    etags = [client.upload_part(Bucket=bucket, Key="mp.bin", UploadId=up["UploadId"], PartNumber=i + 1,
                                Body=body)["ETag"] for i, body in enumerate(parts)]
    done = client.complete_multipart_upload(
        Bucket=bucket, Key="mp.bin", UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]})
    head = client.head_object(Bucket=bucket, Key="mp.bin")
    assert head["ContentLength"] == sum(map(len, parts))
    assert done["ETag"].strip('"').endswith("-2")
    whole_md5 = hashlib.md5(b"".join(parts)).hexdigest()
    if s3_server.kind == "rclone":
        assert head["ETag"].strip('"') == whole_md5  # rclone answers HEAD with the file's own MD5
    elif s3_server.kind == "nanio":
        assert head["ETag"] == done["ETag"]  # nanio keeps the multipart ETag, as S3 and MinIO do


def test_conditional_get(s3_server: S3Server, bucket: str) -> None:
    # provisioner/mirrors.py: a channel read sends If-None-Match and takes a 304 or a full
    # 200 alike (nanio ignores the condition and always sends the body).
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="c.json", Body=b"{}")
    etag = client.head_object(Bucket=bucket, Key="c.json")["ETag"]
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "c.json"}, ExpiresIn=60)
    status = httpx.get(url, headers={"If-None-Match": etag}).status_code
    assert status == {"nanio": 200, "rclone": 304}.get(s3_server.kind, 304)


def test_presigned_url_refusals(s3_server: S3Server, bucket: str) -> None:
    # provisioner/fetch_policy.py: aria2 reports every such refusal as errorCode 22 (HTTP
    # status), and the provisioner presigns again on it, whatever the status and code.
    if s3_server.kind not in LOCAL:
        pytest.skip("expiry checked only on the local servers (their clock is this machine's)")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="p.bin", Body=b"data")
    good = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p.bin"}, ExpiresIn=60)
    assert httpx.get(good).content == b"data"
    tampered = httpx.get(good.replace("Signature=", "Signature=0"))
    assert tampered.status_code == 403 and b"SignatureDoesNotMatch" in tampered.content
    # Expired by the clock, not by speed: 1 s lifetime, used after 2 s have passed.
    short = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "p.bin"}, ExpiresIn=1)
    time.sleep(2.0)
    expired = httpx.get(short)
    status, code = {"nanio": (403, b"RequestTimeTooSkewed"), "rclone": (400, b"AccessDenied")}[s3_server.kind]
    assert expired.status_code == status and code in expired.content, (expired.status_code, expired.content[:200])
