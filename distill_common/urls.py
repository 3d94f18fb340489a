"""Source URLs as we may record them: without the secrets a URL can carry.

A presigned S3 URL (`?X-Amz-Signature=...`), an Azure SAS URL (`?sv=...&sig=...`) or a URL
with `user:password@` grants access to whoever reads it. Manifests, model cards, logs,
progress lines and error messages outlive the run and get shared, so everything that
records a URL passes it through :func:`redact_url` (or a whole message through
:func:`redact_text`) first. Local paths are left as they are.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# A URL inside free text (an error message): a scheme, `://`, then up to whitespace or a
# quote or bracket that would close it in a message.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>(){}]+")
# fsspec chains links with `::` (`zip://a.txt::s3://b/a.zip`, `simplecache::s3://...`);
# the `::` of an IPv6 host (`http://[::1]:8000/`) is not followed by a protocol name.
_CHAIN = re.compile(r"::(?=[A-Za-z][A-Za-z0-9+.\-]*(?:://|::|$))")
_HTTP = ("http", "https")


def _redact_one(url: str) -> str:
    if "://" not in url:
        return url  # a local path (`what?.txt` is a file name, not a query) or a fsspec
        # chain member such as `zip://inner` handled by the caller
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # drop `user:password@`
    # fsspec reads `?` in a non-HTTP URL as a glob character (`s3://b/part-?.txt`) and
    # `#` as part of a key; what grants access is key=value pairs, so only those go there.
    http = parts.scheme.lower() in _HTTP
    query = "" if http or "=" in parts.query else parts.query
    fragment = "" if http or "=" in parts.fragment else parts.fragment
    # not urlunsplit: it turns `memory:///a` (empty host) into `memory:/a`
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{fragment}" if fragment else ""))


def redact_url(url: str) -> str:
    """``url`` without its query string, fragment and userinfo (`user:pass@`).

    Local paths come back unchanged; fsspec chained URLs (``zip://a::s3://b/c?sig=x``)
    are redacted link by link. In a non-HTTP URL a query without ``=`` is kept, as
    fsspec treats ``?`` there as a glob character.
    """
    return "::".join(_redact_one(link) for link in _CHAIN.split(str(url)))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (an error message, a log line) redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


__all__ = ["redact_text", "redact_url"]
