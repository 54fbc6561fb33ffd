"""HTTP to the Hub: its headers and token, listings read within bounds, and its failures as our errors.

The only module that imports huggingface_hub (for the headers and the token it finds). A listing
is read within bounds (pages, entries, bytes, time) and only from the endpoint's own origin, the
only place the token goes; redirects elsewhere drop it. Network and disk exceptions become
caprl-local's errors here, once.
"""

from __future__ import annotations

import errno
import functools
import http.client
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from .errors import CaprlError, DownloadError, HubUnreachableError, NoSpaceError
from .printable import human_size, shown

log = logging.getLogger("caprl_local")

#: Seconds a listing page may take to start answering (as huggingface_hub waits): a stalled network fails fast.
LISTING_TIMEOUT_S = 10.0
# Bounds on a repo's file listing: a hostile or broken Hub must not keep us paging, or fill memory.
MAX_PAGES = 100


MAX_ENTRIES = 100_000


MAX_PAGE_BYTES = 32 << 20


PAGE_TIME_S = 300.0  # one page that takes longer than this to arrive is not coming


def endpoint_url() -> str:
    """The Hub's base URL: $HF_ENDPOINT, else huggingface.co.

    Read at call time, not cached: huggingface_hub reads HF_ENDPOINT once, at import,
    and tests (and long-lived apps) change it afterwards.
    """
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@functools.cache
def hf() -> Any:
    """huggingface_hub, imported on first use, with its own stderr log handler removed:
    the library never prints; its records still reach logging's root for apps to show."""
    import huggingface_hub
    import huggingface_hub.utils

    hf_log = logging.getLogger("huggingface_hub")
    for handler in list(hf_log.handlers):
        if type(handler) is logging.StreamHandler:
            hf_log.removeHandler(handler)
    hf_log.propagate = True
    return huggingface_hub


def open_url(url: str, *, token: str | None, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """An HTTP request with the Hub's headers (token, user agent); redirects elsewhere drop the token."""
    hub_headers = hf().utils.build_hf_headers(token=token, library_name="caprl-local")
    request = urllib.request.Request(url, headers={**hub_headers, **(headers or {})})
    return urllib.request.build_opener(_DropAuthOnRedirect()).open(request, timeout=timeout)


def sends_token(token: str | None) -> bool:
    """Whether a request carries a token: the one given, else HF_TOKEN or a stored login."""
    try:
        return any(k.lower() == "authorization" for k in hf().utils.build_hf_headers(token=token))
    except Exception:  # noqa: BLE001 - only for wording a message; never fail on it
        return token is not None


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port filled in for http(s): what must match for the token to go along."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a port at all: matches nothing
        return ("", "", -1)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


class _DropAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow the Hub's redirects to its file storage without sending the token there."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: http.client.HTTPMessage, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):  # another scheme, host or port
            new.headers = {k: v for k, v in new.headers.items() if k.lower() != "authorization"}
            new.unredirected_hdrs = {k: v for k, v in new.unredirected_hdrs.items() if k.lower() != "authorization"}
        return new


def read_listing(url: str, *, token: str | None, repo: str, doing: str) -> list[Any]:
    """Every entry of a paged JSON listing (the Hub's tree API).

    ``Link: rel="next"`` pages are followed only on the endpoint's own scheme, host and port (so
    the token never goes elsewhere), each URL once, within MAX_PAGES, MAX_ENTRIES and
    MAX_PAGE_BYTES; going past a bound is a DownloadError, never a silently shortened listing.
    """
    home, seen, entries = origin(endpoint_url()), set[str](), list[Any]()
    page_url: str | None = url
    try:
        while page_url is not None:
            if page_url in seen:
                raise DownloadError(f"{doing}: the Hub's listing leads back to a page it already sent; try again later")
            if len(seen) >= MAX_PAGES:
                raise DownloadError(f"{doing}: the Hub's listing runs past {MAX_PAGES} pages; try again later")
            seen.add(page_url)
            with open_url(page_url, token=token, timeout=LISTING_TIMEOUT_S) as response:
                entries += _json_page(response, doing)
                link, here = response.headers.get("Link"), response.geturl()
            if len(entries) > MAX_ENTRIES:
                raise DownloadError(f"{doing}: the Hub lists over {MAX_ENTRIES:,} files; refusing a listing that large")
            page_url = _next_page(link, here)
            if page_url is not None and (origin(page_url) != home or not _plain_url(page_url)):
                raise DownloadError(f"{doing}: the listing's next page is at '{shown(page_url)}', not on "
                                    f"{endpoint_url()}; it was not followed (nor sent the token)")
    except CaprlError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes one typed error
        raise translate_error(exc, doing, token=token, repo=repo) from exc
    return entries


def _next_page(link: str | None, here: str) -> str | None:
    match = re.search(r'<([^>]*)>\s*;\s*rel="?next"?', link or "")
    return urllib.parse.urljoin(here, match.group(1).strip()) if match else None


def _plain_url(url: str) -> bool:
    """No user part, backslash, space or control character: nothing that URL parsers read differently."""
    return url.isascii() and url.isprintable() and not any(c in url for c in " \\@")


def _json_page(response: Any, doing: str) -> list[Any]:
    """One page of a listing as a JSON list, read within MAX_PAGE_BYTES and PAGE_TIME_S; a DownloadError
    if the answer is not one (a captive portal's HTML page, a proxy's error, a truncated body)."""
    kind = shown(response.headers.get_content_type(), 60)
    raw, deadline = bytearray(), time.monotonic() + PAGE_TIME_S
    while chunk := response.read1(1 << 16):
        raw += chunk
        if len(raw) > MAX_PAGE_BYTES:
            raise DownloadError(f"{doing}: a page of the Hub's listing is over {human_size(MAX_PAGE_BYTES)}; "
                                "refusing a listing that large")
        if time.monotonic() > deadline:
            raise DownloadError(f"{doing}: a page of the listing took over {PAGE_TIME_S:g} s to arrive; try again later")
    try:
        page = json.loads(bytes(raw))
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        raise DownloadError(f"{doing}: {endpoint_url()} answered with {kind}, not the Hub's JSON; "
                            "check HF_ENDPOINT or the network's proxy") from None
    if not isinstance(page, list):
        raise DownloadError(f"{doing}: the Hub's answer is not a file listing (not a list of files); try again later")
    return page


class ConnectionClosed(ConnectionError):
    """The server ended a transfer early; a ConnectionError so the retry loop resumes it."""


_NETWORK_ERRNOS = frozenset({errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ETIMEDOUT})


_LOCAL_HINTS = {errno.EACCES: "check its permissions", errno.EPERM: "check its permissions",
                errno.EROFS: "the file system is read-only; keep the cache elsewhere (CAPRL_LOCAL_HOME)"}


def _is_network(exc: BaseException) -> bool:
    """A failure of the connection itself (refused, reset, timed out, no route, no name, TLS, bad HTTP)."""
    return isinstance(exc, (ConnectionError, TimeoutError, http.client.HTTPException, socket.gaierror, socket.herror,
                            ssl.SSLError)) or (isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS)


def translate_error(exc: Exception, doing: str, folder: Path | None = None, *, token: str | None = None,
                    repo: str | None = None) -> CaprlError:
    """One place where network and disk exceptions become ours.

    Only a Hub that cannot be reached at all becomes HubUnreachableError, so callers that would ask
    it again (list_models) can stop by type instead of by message text; a local cause (a folder in
    the way, a permission) names the local path. Anything else is a bug of ours and is raised as it is.
    """
    if isinstance(exc, CaprlError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NoSpaceError(f"{doing}: the disk is full ({folder}); free some space, then download again to resume")
    if isinstance(exc, urllib.error.HTTPError):
        return _http_error(exc.code, doing, token, repo)
    if isinstance(exc, ConnectionClosed):
        return DownloadError(f"{doing}: {exc}; run the same command again to resume where it stopped")
    reason: BaseException = exc
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        reason = exc.reason
    elif isinstance(exc, (urllib.error.URLError, http.client.InvalidURL)):  # "unknown url type", "no host given"
        return DownloadError(f"{doing}: {shown(endpoint_url())} cannot be asked ({shown(exc)}); check HF_ENDPOINT")
    if _is_network(reason):
        return HubUnreachableError(f"{doing}: cannot reach {shown(endpoint_url())} ({shown(reason)}); check the network")
    if isinstance(reason, OSError):  # local: the cache's folders and files
        where = " -> ".join(str(p) for p in (reason.filename, reason.filename2) if p) or str(folder or "the cache")
        hint = _LOCAL_HINTS.get(reason.errno or 0, "fix or remove it, then try again")
        return DownloadError(f"{doing}: {shown(where, 400)}: {shown(reason.strerror or reason)}; {hint}")
    raise exc  # a bug of ours (a ValueError, say): let it surface as one, not as a network problem


def _http_error(code: int, doing: str, token: str | None, repo: str | None) -> DownloadError:
    page = f"{endpoint_url()}/{repo}" if repo else endpoint_url()
    sent = sends_token(token)
    if code == 401 and sent:
        return DownloadError(f"{doing}: the Hub refused the token (HTTP 401); check that the token (HF_TOKEN) is "
                             "valid and may read this repo")
    if code == 401:
        return DownloadError(f"{doing}: access denied (HTTP 401); the repo is private or does not exist: set HF_TOKEN "
                             "to a token that can read it, or check the name")
    if code == 403:
        return DownloadError(f"{doing}: access denied (HTTP 403); if the repo is gated, accept its terms on {page} "
                             + ("with the account the token belongs to, or check the token's permissions" if sent
                                else "and set HF_TOKEN to a token of that account"))
    if code == 404:
        return DownloadError(f"{doing}: not found on {endpoint_url()} (HTTP 404); check the name")
    return DownloadError(f"{doing}: the Hub answered HTTP {code}; try again later")

