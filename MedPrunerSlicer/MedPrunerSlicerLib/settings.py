"""User preferences and the rules about server addresses (no Qt: the store is passed in).

In Slicer the store is `qt.QSettings()` (it has `value(key, default)` and `setValue(key, value)`);
in tests it is a `DictStore`. Keys live under ``MedPrunerSlicer/``.

Address rules (`normalize_server_url`):
* empty -> the default ``http://127.0.0.1:8765``;
* no scheme -> ``http://`` is added, and with no port either, the default port 8765;
* ``localhost`` -> ``127.0.0.1`` (``localhost`` may resolve to the IPv6 ``::1`` first while the
  server listens on IPv4 only, which looks like "server not running");
* ``0.0.0.0`` / ``::`` are refused: they are addresses a server listens on, not ones to connect to;
* user names/passwords in the URL, queries and fragments are refused (the token has its own field);
* a trailing ``/`` is removed; a path prefix (reverse proxy) is kept.

Consent (`ConsentPolicy`): before image data first goes to a server that is not on this computer
(any host outside 127.0.0.0/8 and ::1) the user is asked once per server and Slicer session;
"don't ask again" remembers the server in the store.
"""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit, urlunsplit

from .errors import SettingsError

__all__ = ["DEFAULT_PORT", "DEFAULT_URL", "KEYS", "ConsentPolicy", "DictStore", "Preferences", "is_local_url",
           "normalize_server_url"]

DEFAULT_PORT = 8765
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
HISTORY_LENGTH = 10

KEYS = {
    "url": "MedPrunerSlicer/ServerURL",
    "token": "MedPrunerSlicer/ServerToken",
    "history": "MedPrunerSlicer/ServerURLHistory",
    "consented": "MedPrunerSlicer/ConsentedServers",
    "model": "MedPrunerSlicer/LocalServerModel",
    "port": "MedPrunerSlicer/LocalServerPort",
}


def normalize_server_url(text: str | None) -> str:
    """The canonical form of a server address typed by the user (see the module docstring)."""
    text = (text or "").strip()
    if not text:
        return DEFAULT_URL
    had_scheme = "://" in text
    if not had_scheme:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise SettingsError(f"The server address {text!r} is not valid ({exc}).",
                            f"Use the form http://HOST:PORT, e.g. {DEFAULT_URL}.") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise SettingsError(f"The server address must start with http:// or https://, not {parts.scheme}://.",
                            f"Use the form http://HOST:PORT, e.g. {DEFAULT_URL}.")
    if parts.username or parts.password:
        raise SettingsError("The server address must not contain a user name or password.",
                            "Remove them from the address and put the server's token in the Token field.")
    if parts.query or parts.fragment:
        raise SettingsError("The server address must not contain '?' or '#' parts.",
                            f"Use the form http://HOST:PORT, e.g. {DEFAULT_URL}.")
    host = (parts.hostname or "").lower()
    if not host:
        raise SettingsError(f"The server address {text!r} has no host.", f"Use e.g. {DEFAULT_URL}.")
    if host in ("0.0.0.0", "::", "0:0:0:0:0:0:0:0"):
        raise SettingsError(
            f"{host} is the address a server listens on, not an address to connect to.",
            "Use 127.0.0.1 for a server on this computer, or the server computer's name or IP address.",
        )
    if host == "localhost":
        host = "127.0.0.1"
    if port is None and not had_scheme:
        port = DEFAULT_PORT
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))


def is_local_url(url: str) -> bool:
    """True when the (normalised) URL points at this computer (loopback addresses only)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_key(url: str) -> str:
    """What consent is remembered for: scheme, host and port (not the path)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class DictStore:
    """A dict with QSettings' two methods, for tests and headless use."""

    def __init__(self, data: dict | None = None) -> None:
        self.data = dict(data or {})

    def value(self, key: str, default=None):
        return self.data.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.data[key] = value


def _as_list(raw) -> list[str]:
    """QSettings returns lists as lists, JSON text, a single string or None depending on platform."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, (list, tuple)):
        return [str(x) for x in raw]
    try:
        parsed = json.loads(raw)
        return [str(x) for x in parsed] if isinstance(parsed, list) else [str(raw)]
    except (TypeError, ValueError):
        return [str(raw)]


class Preferences:
    """Typed access to the module's preferences in a QSettings-like store."""

    def __init__(self, store) -> None:
        self.store = store

    @property
    def server_url(self) -> str:
        try:
            return normalize_server_url(self.store.value(KEYS["url"], DEFAULT_URL))
        except SettingsError:
            return DEFAULT_URL

    @server_url.setter
    def server_url(self, text: str) -> None:
        url = normalize_server_url(text)
        self.store.setValue(KEYS["url"], url)
        history = [u for u in self.url_history if u != url]
        self.store.setValue(KEYS["history"], json.dumps(([url] + history)[:HISTORY_LENGTH]))

    @property
    def url_history(self) -> list[str]:
        return _as_list(self.store.value(KEYS["history"], None))

    @property
    def token(self) -> str:
        return str(self.store.value(KEYS["token"], "") or "")

    @token.setter
    def token(self, value: str) -> None:
        self.store.setValue(KEYS["token"], (value or "").strip())

    @property
    def local_model(self) -> str:
        return str(self.store.value(KEYS["model"], "") or "")

    @local_model.setter
    def local_model(self, value: str) -> None:
        self.store.setValue(KEYS["model"], (value or "").strip())


class ConsentPolicy:
    """Asks once per remote server and session; "don't ask again" is remembered in the store."""

    def __init__(self, store) -> None:
        self.store = store
        self._session: set[str] = set()

    def _remembered(self) -> list[str]:
        return _as_list(self.store.value(KEYS["consented"], None))

    def needs_consent(self, url: str) -> bool:
        if is_local_url(url):
            return False
        key = server_key(url)
        return key not in self._session and key not in self._remembered()

    def grant(self, url: str, remember: bool = False) -> None:
        key = server_key(url)
        self._session.add(key)
        if remember and key not in self._remembered():
            self.store.setValue(KEYS["consented"], json.dumps(self._remembered() + [key]))

    def revoke_all(self) -> None:
        self._session.clear()
        self.store.setValue(KEYS["consented"], json.dumps([]))
