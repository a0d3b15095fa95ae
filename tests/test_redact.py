"""Credentials never leave a URI into what the pipeline writes; everything else in it stays readable."""
from __future__ import annotations

import pytest

from tasks.redact import redact_text, redact_uri

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("uri, redacted", [
    ("https://user:pass@host.example/data.zip", "https://***@host.example/data.zip"),
    ("https://token@host.example:8443/d.tgz", "https://***@host.example:8443/d.tgz"),
    ("s3://AKIAKEY:SeCrEt@bucket/prefix/", "s3://***@bucket/prefix/"),
    ("https://b.s3.amazonaws.com/d.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20240101"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=abcdef",
     "https://b.s3.amazonaws.com/d.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=***"),
    ("https://b.s3.amazonaws.com/d.zip?AWSAccessKeyId=AKIA&Signature=abc%3D&Expires=1",
     "https://b.s3.amazonaws.com/d.zip?AWSAccessKeyId=***&Signature=***&Expires=1"),
    ("https://acct.blob.core.windows.net/c/d.zip?sv=2022&sig=abc&se=2030", "https://acct.blob.core.windows.net/c/"
     "d.zip?sv=2022&sig=***&se=2030"),
    ("https://host/d.zip?token=abc&X-Amz-Security-Token=def", "https://host/d.zip?token=***&X-Amz-Security-Token=***"),
    ("https://host/d.zip#access_token=abc", "https://host/d.zip#access_token=***"),
])
def test_credentials_are_redacted_and_the_rest_kept(uri, redacted):
    assert redact_uri(uri) == redacted
    assert redact_uri(redacted) == redacted


@pytest.mark.parametrize("uri", ["idx://fashion_mnist", "tfds://food101?split=train[:20%],validation",
                                 "/data/food", "file:///data/food@2024", "s3://bucket/runs/", "https://host/d.zip?v=2"])
def test_uris_without_credentials_are_unchanged(uri):
    assert redact_uri(uri) == uri


def test_every_uri_inside_a_message_is_redacted():
    message = "https://u:p@h/x.zip: HTTP 503; mirror s3://K:S@b/x.zip?sig=1 failed too"
    assert redact_text(message) == "https://***@h/x.zip: HTTP 503; mirror s3://***@b/x.zip?sig=*** failed too"


def test_every_pipeline_error_message_is_redacted_where_it_is_made():
    from tasks.errors import ConfigError, DatasetError, DownloadError

    for error in (DatasetError("s3://AKIA:SeCrEt@bucket/x.zip: no such archive file"),
                  DownloadError("https://me:pass@host/d.zip?sig=abc: HTTP 503"),
                  ConfigError("source='https://host/d.zip?X-Amz-Signature=abc' is invalid")):
        assert "SeCrEt" not in str(error) and "pass" not in str(error) and "abc" not in str(error)
        assert "SeCrEt" not in repr(error.args) and "***" in str(error)


def test_failed_candidates_specs_and_errors_are_written_redacted(tmp_path):
    from tasks import artifacts, phases
    from tasks.config import RunConfig, candidate_list
    from tasks.errors import TrainingError
    from tasks.steps.select import select

    specs = "s3://AKIA:SeCrEt@models/encoder@96, https://tok:SeCrEt@host/model@128"
    cfg = RunConfig(run_root=str(tmp_path), candidates=specs)
    for candidate in candidate_list(cfg):
        run = cfg.for_candidate(candidate)
        phases.write_failure(run.artifact(artifacts.TRAINING_ERROR), ValueError(f"cannot load {run.backbone}"))
    with pytest.raises(TrainingError) as failed:
        select(cfg, [None, None])
    assert "SeCrEt" not in str(failed.value) and "s3://***@models/encoder@96" in str(failed.value)
    written = "".join(path.read_text() for path in tmp_path.rglob("*.json"))
    assert "cannot load" in written and "SeCrEt" not in written
