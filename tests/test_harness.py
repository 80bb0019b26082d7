"""The harness itself talks to a real S3 server."""

from tests.conftest import S3Server


def test_s3_server_round_trip(s3_server: S3Server, bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="a/")["Contents"]]
    assert keys == ["a/b.txt"]
