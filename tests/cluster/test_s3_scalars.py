"""Custom scalars on object storage (moto's S3 server on 127.0.0.1): whole objects, read back like on disk."""

from __future__ import annotations

import boto3

import rldiag
from tests.analysis.test_io import _step_record


def test_custom_scalars_on_s3(s3_run: str) -> None:
    with rldiag.Recorder(s3_run, roll_steps=2) as rec:
        for s in range(5):
            rec.record(step=s, **_step_record(s))
            rec.log(s, {"loss": 1.0 / (s + 1), "eval/acc": 0.1 * s})
        rec.log(4, {"loss": -1.0})
    bucket, prefix = s3_run[len("s3://") :].split("/", 1)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    scalars = [k for k in keys if "/scalars/" in k]
    assert scalars and all(k.endswith(".parquet") and "/." not in k for k in scalars)  # no temporary objects
    run = rldiag.open_run(s3_run)
    c = run.custom_metrics()
    assert c["loss"].to_list() == [1.0, 0.5, 1.0 / 3, 0.25, -1.0]
    assert run.step_metrics(metrics=["eval/acc"])["eval/acc"].to_list() == [0.1 * s for s in range(5)]
