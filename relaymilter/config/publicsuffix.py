"""The Public Suffix List as distributions ship it: accepted domains like ``co.uk`` are refused.

An organization that "accepts" a public suffix would own every domain under it
(with ``match_subdomains``) or a name no organization can register. Debian's
``publicsuffix`` and EL's ``publicsuffix-list`` both install the list at
``/usr/share/publicsuffix/public_suffix_list.dat``; ``RELAYMILTER_PUBLIC_SUFFIX_LIST``
names another file (for tests, or a system that keeps it elsewhere).

The list's rules are in Unicode (U-labels); a domain is compared in that form,
so only the few ``xn--`` domains of a config need decoding, not the list's
thousand internationalized rules encoding at every load.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import idna

from ..base.safefile import UnsafeFileError, read_regular_file

DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"
ENVIRONMENT_VARIABLE = "RELAYMILTER_PUBLIC_SUFFIX_LIST"
# The list is about 250 kB; ten times that is still a list, more is not.
_MAX_SIZE = 4 * 1024 * 1024


class PublicSuffixListError(Exception):
    """The list cannot be read; the message says which file and why."""


@dataclass(frozen=True)
class PublicSuffixList:
    rules: FrozenSet[str]
    #: ``ck`` for the rule ``*.ck``.
    wildcards: FrozenSet[str]
    #: ``www.ck`` for the rule ``!www.ck``.
    exceptions: FrozenSet[str]

    def is_public_suffix(self, domain: str) -> bool:
        """Whether ``domain`` (comparison form) is itself a public suffix.

        By the list's algorithm, a name with one label is a suffix even when
        the list does not name it (the implicit ``*`` rule).
        """
        name = _unicode(domain)
        if name is None:
            return False
        if name in self.exceptions:
            return False
        if name in self.rules or "." not in name:
            return True
        return name.split(".", 1)[1] in self.wildcards


def parse(text: str) -> PublicSuffixList:
    rules, wildcards, exceptions = set(), set(), set()
    for line in text.splitlines():
        rule = line.split(None, 1)[0].lower() if line.strip() else ""
        if not rule or rule.startswith("//"):
            continue
        if rule.startswith("!"):
            exceptions.add(rule[1:])
        elif rule.startswith("*."):
            wildcards.add(rule[2:])
        else:
            rules.add(rule)
    return PublicSuffixList(frozenset(rules), frozenset(wildcards), frozenset(exceptions))


def list_path() -> str:
    return os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_PATH


_cache: Dict[Tuple[str, int, int], PublicSuffixList] = {}
_lock = threading.Lock()


def load(path: Optional[str] = None) -> PublicSuffixList:
    """The list at ``path`` (default: the distribution's); read once per file version."""
    path = path or list_path()
    try:
        info = os.stat(path)
    except OSError as exc:
        raise PublicSuffixListError(f"{path}: {exc.strerror or exc}") from None
    key = (path, info.st_mtime_ns, info.st_size)
    with _lock:
        cached = _cache.get(key)
        if cached is None:
            try:
                text = read_regular_file(path, _MAX_SIZE, "public suffix list").decode("utf-8")
            except (UnsafeFileError, UnicodeDecodeError) as exc:
                raise PublicSuffixListError(str(exc)) from None
            _cache.clear()  # only the list's current version is worth keeping
            cached = _cache[key] = parse(text)
        return cached


def _unicode(domain: str) -> Optional[str]:
    if "xn--" not in domain:
        return domain
    try:
        return str(idna.decode(domain))
    except (idna.IDNAError, UnicodeError):
        return None
