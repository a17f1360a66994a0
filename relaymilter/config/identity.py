"""The identity of a configuration: a short hash of its text, in every decision record."""

from __future__ import annotations

import hashlib


def config_identity(text: str) -> str:
    """A short hash of the config's text: names the config behind each logged decision."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]
