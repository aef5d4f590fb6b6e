"""Model artifacts link where a browser can open them, and describe local paths instead."""

from __future__ import annotations

from flows.ipr_pipeline import browser_url
from ipr_core.config import load_config


def test_browser_urls():
    plain = load_config(None)
    aws = load_config(None, ["storage.link_template=https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={key}/"])
    assert browser_url(plain, "/data/runs/x/sft/model") is None  # a local path is a dead link in a browser
    assert browser_url(aws, "/data/runs/x/sft/model") is None
    assert browser_url(plain, "s3://b/runs/x/sft/model") is None  # no template: no guess
    assert browser_url(aws, "s3://b/runs/x/sft/model") == "https://s3.console.aws.amazon.com/s3/buckets/b?prefix=runs/x/sft/model/"
    assert browser_url(plain, "https://host/x") == "https://host/x"
