"""URLs as they may appear in logs and on screen: without the secrets people put in them."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["display_url"]


def display_url(url: str) -> str:
    """Drops user and password, and shortens what hosted RPCs use as API keys: a long last
    path segment (``…/v2/<key>``) and the query string."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    segments = parts.path.split("/")
    if host and segments and len(segments[-1]) >= 16:
        segments[-1] = segments[-1][:4] + "…"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{'/'.join(segments)}{query}"
