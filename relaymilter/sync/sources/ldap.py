"""Organizations from LDAP: Exchange's accepted domains in Active Directory, or any layout.

Imported only by ``relaymilter sync`` when an ldap source is configured, so
python-ldap is needed only there. Every connection gets its own options
(never python-ldap's global ones), so two sources with different CAs or
timeouts do not affect each other. Before libldap's TLS, a handshake of
Python's own makes sure the server answers (see _tls_stalls).

Errors name the source, and the server or the entry (its DN) at fault. Values
are passed on as the strings the directory holds: ``relaymilter sync``
validates them as it validates the YAML file, naming each item's DN.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from ...core.sourcesettings import (
    AD_FLAG_MATCH_SUBDOMAINS,
    AD_FLAG_X400,
    LdapConnectorMapping,
    LdapDomainMapping,
    LdapSource,
)
from . import OrganizationCollector, SourceError, SourceResult, domain_item, read_secret

#: An entry with its attribute names lower-cased: AD answers in its own casing.
Attributes = Dict[str, List[bytes]]
Mapping = Union[LdapDomainMapping, LdapConnectorMapping]

ROOT_DSE_BASE_ATTRIBUTE = "configurationNamingContext"


def _import_ldap() -> Any:
    try:
        import ldap
        import ldap.controls
    except ImportError:
        raise SourceError(
            "an ldap source needs python-ldap: install python3-ldap (EL: python3-ldap)"
        ) from None
    return ldap


def fetch(source: LdapSource) -> SourceResult:
    """Read the source's organizations from the first of its servers that answers."""
    ldap = _import_ldap()
    password = _password(source)
    connection, uri = _connect(ldap, source, password)
    try:
        reader = DirectoryReader(ldap, connection, source, uri)
        base = _base(reader, source)
        collector = OrganizationCollector()
        records, bases = 0, []
        if source.accepted_domains is not None:
            # A mapping's own base, else the source's.
            bases.append(source.accepted_domains.base or base)
            records += reader.read_domains(source.accepted_domains, bases[-1], collector)
        if source.connectors is not None:
            bases.append(source.connectors.base or base)
            records += reader.read_connectors(source.connectors, bases[-1], collector)
        searched = ", ".join(dict.fromkeys(b for b in bases if b))
        return collector.result(records, f"{uri}, base {searched}")
    finally:
        _close(ldap, connection)


def _base(reader: DirectoryReader, source: LdapSource) -> str:
    """The source's base; "" when each mapping has its own (no RootDSE to read then)."""
    if source.base is not None:
        return source.base
    mappings: List[Mapping] = [
        m for m in (source.accepted_domains, source.connectors) if m is not None
    ]
    if mappings and all(m.base is not None for m in mappings):
        return ""
    return reader.configuration_base()


def _password(source: LdapSource) -> Optional[str]:
    """The bind password, read before any connection; None for an anonymous bind."""
    if source.bind_dn is None:
        return None
    if source.password_file is None:
        raise SourceError(f"ldap source {source.name!r}: bind_dn needs a password_file")
    try:
        return read_secret(source.password_file)
    except SourceError as exc:
        raise SourceError(f"ldap source {source.name!r}: {exc}") from None


# -- connecting ---------------------------------------------------------------


def _connect(ldap: Any, source: LdapSource, password: Optional[str]) -> Tuple[Any, str]:
    """The first server that connects and binds, and its URI; else why each one failed."""
    if not source.uris:
        raise SourceError(f"ldap source {source.name!r}: no server URI")
    reasons = []
    for uri in source.uris:
        try:
            return _open(ldap, source, uri, password), uri
        except _Stalled as exc:
            reasons.append(f"{uri}: {exc}")
        except ldap.LDAPError as exc:
            reasons.append(f"{uri}: {_failure(ldap, exc, source, uri)}")
    raise SourceError(f"ldap source {source.name!r}: no server answered: " + "; ".join(reasons))


class _Stalled(Exception):
    """The server's TLS handshake would keep libldap waiting for ever."""


def _open(ldap: Any, source: LdapSource, uri: str, password: Optional[str]) -> Any:
    if _uses_tls(source, uri):
        stalled = _tls_stalls(uri, _starttls(source, uri), source.timeout)
        if stalled:
            raise _Stalled(stalled)
    connection = ldap.initialize(uri)
    try:
        _set_options(ldap, connection, source, uri)
        if _starttls(source, uri):
            connection.start_tls_s()
        if source.bind_dn is None:
            connection.simple_bind_s("", "")
        else:
            connection.simple_bind_s(source.bind_dn, password)
    except BaseException:
        _close(ldap, connection)
        raise
    return connection


def _set_options(ldap: Any, connection: Any, source: LdapSource, uri: str) -> None:
    connection.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
    # AD refers to its other partitions; following a referral would bind anonymously there.
    connection.set_option(ldap.OPT_REFERRALS, 0)
    connection.set_option(ldap.OPT_NETWORK_TIMEOUT, source.timeout)
    connection.set_option(ldap.OPT_TIMEOUT, source.timeout)
    if _uses_tls(source, uri):
        # Explicit, whatever ldap.conf says: a source must never trust an unverified server.
        connection.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        if source.ca_file is not None:
            connection.set_option(ldap.OPT_X_TLS_CACERTFILE, source.ca_file)
        # libldap applies the TLS options above only to a context made after them.
        connection.set_option(ldap.OPT_X_TLS_NEWCTX, 0)


def _is_ldaps(uri: str) -> bool:
    return uri.lower().startswith("ldaps://")


def _starttls(source: LdapSource, uri: str) -> bool:
    return source.starttls and not _is_ldaps(uri)


def _uses_tls(source: LdapSource, uri: str) -> bool:
    return source.starttls or _is_ldaps(uri)


def _close(ldap: Any, connection: Any) -> None:
    # Closing a connection that failed: its error has been reported.
    with contextlib.suppress(ldap.LDAPError):
        connection.unbind_s()


def _failure(ldap: Any, exc: Exception, source: LdapSource, uri: str) -> str:
    """Why a server could not be used, with the certificate problem if there was one."""
    reason = _describe(ldap, exc, source.timeout)
    if not isinstance(exc, (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)):
        return reason
    # libldap built with OpenSSL (EL's) names the certificate problem itself.
    if not _uses_tls(source, uri) or "certificate" in reason:
        return reason
    problem = _tls_problem(uri, _starttls(source, uri), source.ca_file, source.timeout)
    return f"{reason} ({problem})" if problem else reason


def _describe(ldap: Any, exc: Exception, timeout: float) -> str:
    """libldap's description and its diagnostic (``info``), e.g. why a certificate failed."""
    if isinstance(exc, ldap.TIMEOUT):
        return f"no answer within {timeout:g} s"
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    desc = str(details.get("desc") or type(exc).__name__)
    info = str(details.get("info") or "").strip()
    return f"{desc}: {info}" if info and info != desc else desc


# -- TLS: what libldap does not say ------------------------------------------

#: LDAPMessage {messageID 1, extendedReq {requestName 1.3.6.1.4.1.1466.20037}}: StartTLS.
_STARTTLS_REQUEST = b"\x30\x1d\x02\x01\x01\x77\x18\x80\x16" + b"1.3.6.1.4.1.1466.20037"


def _tls_stalls(uri: str, starttls: bool, timeout: float) -> Optional[str]:
    """Why not to hand this server to libldap: its TLS handshake does not finish in time.

    libldap with GnuTLS (Debian's) ignores its timeouts during the handshake
    and spins on a server that accepts the connection but never answers, so a
    handshake of Python's own goes first. It checks no certificate (libldap's
    verdict is the one that counts) and fails nothing but a stalled server.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _handshake(uri, starttls, context, timeout)
    except socket.timeout:
        return f"no TLS handshake within {timeout:g} s"
    except (OSError, ValueError):
        pass  # libldap meets the same problem and says it in its words.
    return None


def _tls_problem(uri: str, starttls: bool, ca_file: Optional[str], timeout: float) -> Optional[str]:
    """Why the server's certificate is refused, found by a handshake of Python's own.

    libldap with GnuTLS (Debian's) reports a refused certificate as
    "(unknown error code)"; the operator needs to know which check failed.
    None when the handshake succeeds or fails for another reason.
    """
    try:
        _handshake(uri, starttls, ssl.create_default_context(cafile=ca_file), timeout)
    except ssl.SSLCertVerificationError as exc:
        return f"certificate verify failed: {exc.verify_message}"
    except (OSError, ValueError):
        pass
    return None


def _handshake(uri: str, starttls: bool, context: ssl.SSLContext, timeout: float) -> None:
    parts = urlsplit(uri)
    host, port = parts.hostname, parts.port or (389 if starttls else 636)
    if parts.scheme.lower() not in ("ldap", "ldaps") or not host:
        raise ValueError(f"{uri}: not over TCP")
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if starttls:
            sock.sendall(_STARTTLS_REQUEST)
            _read_ldap_message(sock)
        with context.wrap_socket(sock, server_hostname=host):
            pass


def _read_ldap_message(sock: socket.socket) -> bytes:
    """One BER-encoded message (the StartTLS response), whatever it says."""
    header = _read_exactly(sock, 2)
    length = header[1]
    if length & 0x80:
        length = int.from_bytes(_read_exactly(sock, length & 0x7F), "big")
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


# -- reading ------------------------------------------------------------------


@dataclass
class DirectoryReader:
    """Reads one source's entries over a bound connection, naming each entry by its DN in errors."""

    ldap: Any
    connection: Any
    source: LdapSource
    uri: str

    def configuration_base(self) -> str:
        """Active Directory's configuration partition, named in the RootDSE."""
        filterstr = "(objectClass=*)"
        try:
            entries = self.connection.search_ext_s(
                "",
                self.ldap.SCOPE_BASE,
                filterstr,
                [ROOT_DSE_BASE_ATTRIBUTE],
                timeout=self.source.timeout,
            )
        except self.ldap.LDAPError as exc:
            raise self._search_error("", filterstr, exc) from None
        for _dn, attributes in entries:
            values = _lower_names(attributes).get(ROOT_DSE_BASE_ATTRIBUTE.lower())
            if values:
                return _text(values[0], "the RootDSE", ROOT_DSE_BASE_ATTRIBUTE, self.source)
        raise SourceError(
            f"ldap source {self.source.name!r}: {self.uri} has no {ROOT_DSE_BASE_ATTRIBUTE} in "
            "its RootDSE, so it is not Active Directory: set the source's base"
        )

    def read_domains(
        self, mapping: LdapDomainMapping, base: str, collector: OrganizationCollector
    ) -> int:
        records = 0
        attributes = [mapping.domain_attribute]
        if mapping.flags_attribute is not None:
            attributes.append(mapping.flags_attribute)
        for dn, entry in self._entries(mapping, base, attributes):
            origin = self._origin(dn)
            organization = self._organization(mapping, dn, entry)
            flags = self._flags(mapping, dn, entry)
            values = self._values(dn, entry, mapping.domain_attribute, required=True)
            records += 1
            if flags & AD_FLAG_X400:
                # An X.400 address space (C=US;A= ;P=Contoso;O=Exchange;), left from
                # older Exchange versions: no SMTP domain, nothing to accept.
                collector.notes.append(
                    f"skipped the X.400 accepted domain {', '.join(map(repr, values))} "
                    f"({self._origin(dn)}): not an SMTP domain"
                )
                continue
            subdomains = bool(flags & AD_FLAG_MATCH_SUBDOMAINS)
            for value in values:
                collector.add_domain(organization, domain_item(value, subdomains), origin)
        return records

    def _flags(self, mapping: LdapDomainMapping, dn: str, entry: Attributes) -> int:
        """Exchange's msExchAcceptedDomainFlags of an entry (0 when it has none)."""
        if mapping.flags_attribute is None or mapping.flags_attribute.lower() not in entry:
            return 0
        text = self._single(dn, entry, mapping.flags_attribute)
        try:
            return int(text)
        except ValueError:
            raise self._error(dn, f"{mapping.flags_attribute} is {text!r}, not a number") from None

    def read_connectors(
        self, mapping: LdapConnectorMapping, base: str, collector: OrganizationCollector
    ) -> int:
        records = 0
        for dn, entry in self._entries(mapping, base, _connector_attributes(mapping)):
            organization = self._organization(mapping, dn, entry)
            collector.add_connector(
                organization, self._connector(mapping, dn, entry), self._origin(dn)
            )
            records += 1
        return records

    def _connector(
        self, mapping: LdapConnectorMapping, dn: str, entry: Attributes
    ) -> Dict[str, Any]:
        connector: Dict[str, Any] = {"name": self._single(dn, entry, mapping.name_attribute)}
        lists = (
            ("sender_ip_addresses", mapping.sender_ip_addresses_attribute),
            ("trusted_issuers", mapping.trusted_issuers_attribute),
        )
        for key, attribute in lists:
            if attribute is not None and attribute.lower() in entry:
                connector[key] = self._values(dn, entry, attribute)
        tls_name = mapping.tls_sender_certificate_name_attribute
        if tls_name is not None and tls_name.lower() in entry:
            connector["tls_sender_certificate_name"] = self._single(dn, entry, tls_name)
        # In the YAML's order, which the status and errors show.
        order = ("name", "sender_ip_addresses", "tls_sender_certificate_name", "trusted_issuers")
        return {key: connector[key] for key in order if key in connector}

    def _organization(self, mapping: Mapping, dn: str, entry: Attributes) -> str:
        if mapping.organization is not None:
            return mapping.organization
        if mapping.organization_attribute is None:
            raise self._error(
                dn, "the mapping names neither organization nor organization_attribute"
            )
        return self._single(dn, entry, mapping.organization_attribute)

    def _single(self, dn: str, entry: Attributes, attribute: str) -> str:
        values = self._values(dn, entry, attribute, required=True)
        if len(values) > 1:
            raise self._error(dn, f"{attribute} has {len(values)} values, one is expected")
        return values[0]

    def _values(
        self, dn: str, entry: Attributes, attribute: str, required: bool = False
    ) -> List[str]:
        raw = entry.get(attribute.lower(), [])
        if required and not raw:
            raise self._error(dn, f"no {attribute}")
        return [_text(value, dn, attribute, self.source) for value in raw]

    def _entries(
        self, mapping: Mapping, base: str, attributes: List[str]
    ) -> Iterator[Tuple[str, Attributes]]:
        if mapping.organization_attribute is not None:
            attributes = [*attributes, mapping.organization_attribute]
        return self._search(base, self.ldap.SCOPE_SUBTREE, mapping.filter, attributes)

    def _search(
        self, base: str, scope: int, filterstr: str, attributes: List[str]
    ) -> Iterator[Tuple[str, Attributes]]:
        try:
            yield from self._pages(base, scope, filterstr, attributes)
        except self.ldap.LDAPError as exc:
            raise self._search_error(base, filterstr, exc) from None

    def _search_error(self, base: str, filterstr: str, exc: Exception) -> SourceError:
        return SourceError(
            f"ldap source {self.source.name!r}: {self.uri}: searching {base!r} "
            f"for {filterstr}: {_describe(self.ldap, exc, self.source.timeout)}"
        )

    def _pages(
        self, base: str, scope: int, filterstr: str, attributes: List[str]
    ) -> Iterator[Tuple[str, Attributes]]:
        """All entries, a page at a time: AD's MaxPageSize and slapd's limits cap a page only."""
        paging = self.ldap.controls.SimplePagedResultsControl(
            criticality=False, size=self.source.page_size, cookie=b""
        )
        while True:
            message = self.connection.search_ext(
                base,
                scope,
                filterstr,
                attributes,
                serverctrls=[paging],
                timeout=self.source.timeout,
            )
            _type, data, _id, controls = self.connection.result3(
                message, timeout=self.source.timeout
            )
            for dn, attributes_found in data:
                # Search references (dn None): with referrals off, they point elsewhere.
                if dn is not None:
                    yield dn, _lower_names(attributes_found)
            paging.cookie = _next_cookie(controls, paging.controlType)
            if not paging.cookie:
                return

    def _origin(self, dn: str) -> str:
        return f"ldap {self.source.name!r}: {dn}"

    def _error(self, dn: str, problem: str) -> SourceError:
        return SourceError(f"ldap source {self.source.name!r}: {dn}: {problem}")


def _lower_names(attributes: Attributes) -> Attributes:
    return {name.lower(): values for name, values in attributes.items()}


def _connector_attributes(mapping: LdapConnectorMapping) -> List[str]:
    optional = (
        mapping.sender_ip_addresses_attribute,
        mapping.tls_sender_certificate_name_attribute,
        mapping.trusted_issuers_attribute,
    )
    return [mapping.name_attribute, *(a for a in optional if a is not None)]


def _next_cookie(controls: List[Any], control_type: str) -> bytes:
    for control in controls:
        if control.controlType == control_type:
            return bytes(control.cookie or b"")
    # No paging control back: the server ignored paging and sent everything.
    return b""


def _text(value: bytes, where: str, attribute: str, source: LdapSource) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(
            f"ldap source {source.name!r}: {where}: {attribute} is not UTF-8"
        ) from None
