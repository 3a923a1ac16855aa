"""Object storage against a real S3-compatible server (moto's server mode on 127.0.0.1): inputs
read from s3://, plans published atomically there, and read back by `BatchPlan`, `LocalPlan`,
the Dask engine and the REST service."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from b3mine import storage
from b3mine.errors import PlanError
from b3mine.mining import mine
from b3mine.plan import MANIFEST, BatchPlan


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port of 127.0.0.1, with a bucket; AWS_* point at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.setenv("B3MINE_CACHE", str(tmp_path_factory.mktemp("cache")))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("b3mine-test")
    yield fs
    mp.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def s3_corpus(s3, corpus_path) -> str:
    s3.put_file(str(corpus_path), "b3mine-test/corpora/corpus.parquet")
    return "s3://b3mine-test/corpora/corpus.parquet"


def same_plan(a: BatchPlan, b: BatchPlan) -> None:
    assert a.plan_id == b.plan_id and a.manifest.files == b.manifest.files


def test_mine_from_and_to_s3(s3, s3_corpus, small_plan):
    plan = mine(s3_corpus, small_plan.config, "s3://b3mine-test/plans")
    same_plan(small_plan, plan)  # same bytes as the plan mined from the local file
    url = f"s3://b3mine-test/plans/{plan.plan_id}"
    listed = sorted(p.rsplit("/", 1)[1] for p in s3.ls(url.removeprefix("s3://")))
    assert listed == sorted([MANIFEST, *plan.manifest.files])
    assert not [p for p in s3.ls("b3mine-test/plans") if p.rsplit("/", 1)[1].startswith(".")]
    assert storage.list_plan_ids("s3://b3mine-test/plans") == [plan.plan_id]
    # read back through the plan-reading interface: a verified local copy
    back = BatchPlan.open(url, validate=True)
    same_plan(plan, back)
    np.testing.assert_array_equal(back.batch_rows(1), small_plan.batch_rows(1))


def test_readers_ignore_a_plan_whose_manifest_lists_missing_files(s3, small_plan, tmp_path):
    local = tmp_path / small_plan.plan_id
    shutil.copytree(small_plan.path, local)
    url = "s3://b3mine-test/partial"
    # a writer that died after the manifest but before a file (never our order, but a reader
    # must not trust it), and one that died before the manifest
    s3.put_file(str(local / MANIFEST), f"b3mine-test/partial/{small_plan.plan_id}/{MANIFEST}")
    s3.put_file(str(local / "clusters.parquet"),
                "b3mine-test/partial/other/clusters.parquet")
    assert storage.plan_manifest(f"{url}/{small_plan.plan_id}") is None
    assert storage.list_plan_ids(url) == []
    with pytest.raises(PlanError, match="no complete plan"):
        BatchPlan.open(f"{url}/{small_plan.plan_id}")
    # a truncated file (size differs from the manifest) is incomplete too
    for name in small_plan.manifest.files:
        s3.put_file(str(local / name), f"b3mine-test/partial/{small_plan.plan_id}/{name}")
    assert storage.plan_manifest(f"{url}/{small_plan.plan_id}") is not None
    s3.pipe(f"b3mine-test/partial/{small_plan.plan_id}/batches.parquet", b"PAR1")
    assert storage.plan_manifest(f"{url}/{small_plan.plan_id}") is None


def test_local_plan_and_service_read_from_s3(s3, s3_corpus, small_plan, tmp_path):
    import httpx

    from service.app import create_app
    from service.settings import Settings
    from service.testing import UvicornThread
    from trainers.plans import LocalPlan

    url = storage.publish_plan(small_plan.path, "s3://b3mine-test/served")
    trainer_plan = LocalPlan(url)
    assert trainer_plan.plan_id == small_plan.plan_id
    assert trainer_plan.epoch_table(0).equals(LocalPlan(small_plan.path).epoch_table(0))
    assert trainer_plan.batch_negatives(0, 1).equals(
        LocalPlan(small_plan.path).batch_negatives(0, 1))

    settings = Settings(data_root=tmp_path / "data", plans_url="s3://b3mine-test/served")
    with UvicornThread(create_app(settings)) as server:
        listed = httpx.get(f"{server.url}/v1/plans", timeout=30).json()
        assert small_plan.plan_id in json.dumps(listed)
        got = httpx.get(f"{server.url}/v1/plans/{small_plan.plan_id}/epochs/1/batches/2",
                        timeout=30)
        assert got.status_code == 200, got.text
        rows = got.json()["rows"]
        assert rows == small_plan.batch_rows(1)[2].tolist()


def test_dask_engine_reads_and_publishes_s3(s3, s3_corpus, small_plan):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from pipelines.engine import run_job

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        result = run_job(s3_corpus, small_plan.config, "s3://b3mine-test/dask", client=client)
    assert result.plan.plan_id == small_plan.plan_id
    assert storage.list_plan_ids("s3://b3mine-test/dask") == [small_plan.plan_id]
    back = BatchPlan.open(f"s3://b3mine-test/dask/{small_plan.plan_id}", validate=True)
    for name in ("clusters.parquet", "batches.parquet", "negatives.parquet"):
        assert back.manifest.files[name] == small_plan.manifest.files[name]
