"""Storage tiers: local layout, and S3 publish/fetch against the real loopback S3 server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from dagster_aws.s3 import S3Resource

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.core.storage import LocalStorage, S3Storage, storage_from_setting
from export_pipeline.providers.deliveries import DeliveriesProvider
from export_pipeline.sandbox.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, S3Server

KIND = DeliveriesProvider.kinds[0]  # deliveries/outbound_messages


def write_files(directory: Path) -> dict[str, bytes]:
    """Two files: a small CSV and a 9 MiB binary (above boto3's multipart threshold)."""
    contents = {
        "export.csv": b"id,created_at\nmsg_1,2026-01-01T00:00:00.000Z\n",
        "part-0001.parquet": os.urandom(9 * 1024 * 1024),
    }
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return contents


def fresh_bucket(s3_server: S3Server) -> str:
    bucket = f"storage-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(bucket)
    return bucket


def test_local_layout_and_publish_is_in_place(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "data")
    raw = storage.local_dir("raw", KIND, "exp-1")
    assert raw == tmp_path / "data" / "raw" / "deliveries" / "outbound_messages" / "exp-1"
    assert raw.is_dir()
    parquet = storage.local_dir("parquet", KIND, "exp-1")
    assert parquet == tmp_path / "data" / "parquet" / "deliveries" / "outbound_messages" / "exp-1"
    contents = write_files(raw)
    uri = storage.publish("raw", KIND, "exp-1", raw)
    assert Path(uri) == raw
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == contents  # untouched
    fetched = storage.fetch(uri, tmp_path / "elsewhere")
    assert {p.name: p.read_bytes() for p in fetched} == contents


def test_local_rejects_unknown_tier_and_unsafe_ids(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(ValueError, match="tier"):
        storage.local_dir("bronze", KIND, "exp-1")
    with pytest.raises(ValueError, match="unsafe"):
        storage.local_dir("raw", KIND, "../../etc")


def test_s3_publish_uploads_and_fetch_is_byte_identical(
    s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = fresh_bucket(s3_server)
    client = s3_server.client()
    storage = S3Storage(client, bucket, "/lake/prod/", tmp_path / "cache")
    work = storage.local_dir("raw", KIND, "exp-1")
    assert work == tmp_path / "cache" / "raw" / "deliveries" / "outbound_messages" / "exp-1"
    contents = write_files(work)

    uri = storage.publish("raw", KIND, "exp-1", work)
    assert uri == f"s3://{bucket}/lake/prod/raw/deliveries/outbound_messages/exp-1/"
    listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    assert {obj["Key"]: obj["Size"] for obj in listed} == {
        f"lake/prod/raw/deliveries/outbound_messages/exp-1/{name}": len(data)
        for name, data in contents.items()
    }

    # Another worker: an empty cache, only the URI.
    other = S3Storage(s3_server.client(), bucket, "lake/prod", tmp_path / "other-cache")
    fetched = other.fetch(uri, tmp_path / "loader")
    assert [p.name for p in fetched] == sorted(contents)
    assert {p.name: p.read_bytes() for p in fetched} == contents


def test_s3_republish_drops_stale_parts(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = fresh_bucket(s3_server)
    storage = S3Storage(s3_server.client(), bucket, "p", tmp_path / "cache")
    work = storage.local_dir("parquet", KIND, "exp-2")
    write_files(work)
    uri = storage.publish("parquet", KIND, "exp-2", work)
    (work / "part-0001.parquet").unlink()
    storage.publish("parquet", KIND, "exp-2", work)
    assert [p.name for p in storage.fetch(uri, tmp_path / "again")] == ["export.csv"]


def test_fetch_of_nothing_is_an_error(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = fresh_bucket(s3_server)
    storage = S3Storage(s3_server.client(), bucket, "", tmp_path)
    with pytest.raises(FileNotFoundError):
        storage.fetch(f"s3://{bucket}/raw/deliveries/outbound_messages/missing/", tmp_path / "x")


def test_storage_from_setting(s3_server: S3Server, tmp_path: Path) -> None:
    assert isinstance(
        storage_from_setting("local", data_dir=tmp_path, s3_client_factory=None), LocalStorage
    )
    assert isinstance(
        storage_from_setting("", data_dir=tmp_path, s3_client_factory=None), LocalStorage
    )
    with pytest.raises(ConfigurationError, match="S3 client"):
        storage_from_setting("s3://bucket/prefix", data_dir=tmp_path, s3_client_factory=None)
    with pytest.raises(ConfigurationError, match="unknown storage"):
        storage_from_setting("gs://bucket", data_dir=tmp_path, s3_client_factory=None)

    # The deployment path: the client comes from dagster-aws's S3Resource.
    bucket = fresh_bucket(s3_server)
    resource = S3Resource(
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=DUMMY_ACCESS_KEY,
        aws_secret_access_key=DUMMY_SECRET_KEY,
    )
    storage = storage_from_setting(
        f"s3://{bucket}/warehouse", data_dir=tmp_path, s3_client_factory=resource.get_client
    )
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == (bucket, "warehouse")
    work = storage.local_dir("raw", KIND, "exp-3")
    assert work.is_relative_to(tmp_path / "cache")
    (work / "export.csv").write_bytes(b"id\nmsg_1\n")
    uri = storage.publish("raw", KIND, "exp-3", work)
    assert uri.startswith(f"s3://{bucket}/warehouse/raw/")
    [fetched] = storage.fetch(uri, tmp_path / "loaded")
    assert fetched.read_bytes() == b"id\nmsg_1\n"


def test_parquet_published_to_s3_loads_into_duckdb_elsewhere(
    s3_server: S3Server, tmp_path: Path
) -> None:
    import duckdb

    bucket = fresh_bucket(s3_server)
    writer = S3Storage(s3_server.client(), bucket, "lake", tmp_path / "worker-a")
    work = writer.local_dir("parquet", KIND, "exp-4")
    duckdb.sql(
        "COPY (SELECT 'msg_' || i AS id, i AS attempt_count FROM range(1000) t(i)) "
        f"TO '{work / 'part-0001.parquet'}' (FORMAT parquet)"
    )
    uri = writer.publish("parquet", KIND, "exp-4", work)

    reader = S3Storage(s3_server.client(), bucket, "lake", tmp_path / "worker-b")
    [part] = reader.fetch(uri, reader.local_dir("parquet", KIND, "exp-4"))
    assert not part.is_relative_to(tmp_path / "worker-a")
    count, total = duckdb.sql(f"SELECT count(*), sum(attempt_count) FROM '{part}'").fetchall()[0]
    assert (count, total) == (1000, sum(range(1000)))
