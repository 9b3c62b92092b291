"""Links a person can click: presigned HTTPS URLs for objects on S3 (tested against the real S3 server on
loopback), file:// URLs for local files."""

import time
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from adaptflow.config import load_config
from adaptflow.store import storage


@pytest.fixture
def bucket(s3_env):
    return s3_env.bucket(f"t-{uuid.uuid4().hex[:12]}")


def test_an_s3_report_link_is_a_presigned_url_that_opens_as_html_until_it_expires(s3_env, bucket):
    report = storage.join(bucket, "store", "runs", "r1", "report.html")
    storage.write_bytes(report, b"<!DOCTYPE html><p>report</p>")
    assert storage.info(report)["ContentType"] == "text/html; charset=utf-8"  # stored as a page, not bytes
    url = storage.browser_url(report, 2)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}" == s3_env.endpoint  # https against AWS: the endpoint's scheme
    assert parts.path.endswith("/store/runs/r1/report.html")
    # signed as botocore signs for this endpoint: SigV4 (X-Amz-Expires: seconds) or SigV2 (Expires: epoch)
    signed_at = time.time()
    if "X-Amz-Signature" in query:
        assert query["X-Amz-Expires"] == ["2"]
    else:
        assert query["Signature"] and abs(int(query["Expires"][0]) - (signed_at + 2)) <= 2
    assert s3_env.secret not in url  # the access key ID is in the URL (it names the signer); the secret never

    opened = httpx.get(url, timeout=10)  # no credentials of its own: the URL is the permission
    assert opened.status_code == 200 and opened.content == b"<!DOCTYPE html><p>report</p>"
    assert opened.headers["content-type"].startswith("text/html")  # a browser shows it, not downloads it
    assert httpx.get(f"{s3_env.endpoint}{parts.path}", timeout=10).status_code == 403  # unsigned: refused
    time.sleep(3)
    assert httpx.get(url, timeout=10).status_code == 403  # expired


def test_local_files_become_file_urls_and_other_stores_stay_as_they_are(tmp_path, memory_uri):
    assert storage.browser_url(str(tmp_path / "h.html"), 60) == f"file://{tmp_path}/h.html"
    assert storage.browser_url(f"{memory_uri}/h.html", 60) == f"{memory_uri}/h.html"
    assert storage.browser_url("s3://bucket/h.html", None) == "s3://bucket/h.html"  # links.expiry_s: null


def test_the_link_lifetime_is_a_setting_within_s3s_limit():
    from adaptflow.errors import ConfigError

    assert load_config(None, []).links.expiry_s == 7 * 24 * 3600
    assert load_config(None, ["links.expiry_s=3600"]).links.expiry_s == 3600
    assert load_config(None, ["links.expiry_s=null"]).links.expiry_s is None
    with pytest.raises(ConfigError, match="links.expiry_s: Input should be less than or equal to 604800"):
        load_config(None, ["links.expiry_s=604801"])
