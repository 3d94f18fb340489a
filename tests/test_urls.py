"""`redact_url` / `redact_text`: what a recorded URL keeps and what it loses."""

from __future__ import annotations

import pytest

from distill_common.urls import redact_text, redact_url


@pytest.mark.parametrize("url,recorded", [
    ("https://b.s3.amazonaws.com/c/a.txt?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc123",
     "https://b.s3.amazonaws.com/c/a.txt"),
    ("https://acct.blob.core.windows.net/c/a.jsonl?sv=2022-11-02&se=2030&sig=k%2Bz%3D",
     "https://acct.blob.core.windows.net/c/a.jsonl"),
    ("https://user:secret@host:8443/data/a.txt#part", "https://host:8443/data/a.txt"),
    ("http://[::1]:8000/a.txt?sig=x", "http://[::1]:8000/a.txt"),
    ("s3://AKIA:secret@bucket/a.txt", "s3://bucket/a.txt"),
    ("s3://bucket/a.parquet?versionId=3", "s3://bucket/a.parquet"),
    ("memory://corpus/a.txt?sig=x", "memory://corpus/a.txt"),
    ("memory:///corpus/a.txt?sig=x", "memory:///corpus/a.txt"),
    ("file:///data/a.txt?token=x", "file:///data/a.txt"),
    # fsspec chains: every link
    ("zip://inner.txt::https://h/a.zip?sig=x", "zip://inner.txt::https://h/a.zip"),
    ("simplecache::s3://k:s@bucket/a.txt", "simplecache::s3://bucket/a.txt"),
    # kept: a glob `?` in a non-HTTP URL, local paths, named corpora
    ("s3://bucket/part-?.txt", "s3://bucket/part-?.txt"),
    ("/data/what?.txt", "/data/what?.txt"),
    ("relative/a b.txt", "relative/a b.txt"),
    ("wiki_summaries", "wiki_summaries"),
])
def test_redact_url(url, recorded):
    assert redact_url(url) == recorded
    assert redact_url(recorded) == recorded  # idempotent


def test_redact_text_redacts_every_url_in_a_message():
    message = ("a.txt: cannot read (ClientResponseError: 403, url='https://h/a.txt?sig=S1'); "
               "also s3://k:S2@b/c and https://u:S3@h/x?y=S4 and /local/what?.txt")
    redacted = redact_text(message)
    assert not any(secret in redacted for secret in ("S1", "S2", "S3", "S4"))
    assert "url='https://h/a.txt'" in redacted and "s3://b/c" in redacted
    assert "/local/what?.txt" in redacted
