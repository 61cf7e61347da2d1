"""Who may use the servers: API keys, the rule for leaving loopback, refusals, and the access log line.

Keys come from a file (``--api-key-file``, one per line) or ``$CCLD_TRT_API_KEY``, never from the command line
(it shows in ``ps``). Only their SHA-256 digests are kept: a presented key is hashed and compared with every
digest by ``hmac.compare_digest`` (constant time, and the digests have one length whatever was presented), so
neither the process's memory nor Ray's stored configuration holds a key. A client is named by its key's short
id (a different hash, 8 hex digits) or, without keys, by its address: that name is what logs and /v1/stats show
(how much each may use is counted in fair_share.py).

The page (``serve``) and the cluster share the host rule: a host other machines can reach needs ``--listen``,
and then a key, unless the operator says ``--insecure``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import stat
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccld_trt.export.errors import UserError

KEY_ENV = "CCLD_TRT_API_KEY"
MIN_KEY_CHARS = 16
# query parameters that look like a credential: refused, as a URL ends up in proxies' and servers' logs
KEY_PARAMS = frozenset({"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "authorization",
                        "password"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_id(key: str) -> str:
    """A key's public name, e.g. "key-3f2a9c1b": a short hash that is not the digest keys are checked against."""
    return "key-" + hashlib.sha256(b"ccld-trt key id\0" + key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


@dataclass(frozen=True)
class Keys:
    """The accepted keys as SHA-256 digests (hex) with their ids; empty: no key is asked for."""

    digests: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, keys: Iterable[str]) -> Keys:
        unique = list(dict.fromkeys(keys))
        return cls(tuple(_digest(k).hex() for k in unique), tuple(key_id(k) for k in unique))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def identify(self, presented: str) -> str | None:
        """The id of the key ``presented`` is, or None. Every digest is compared, in constant time each."""
        digest = _digest(presented)
        found = None
        for expected, name in zip(self.digests, self.ids, strict=True):
            if hmac.compare_digest(bytes.fromhex(expected), digest):
                found = name
        return found


def _check_key(key: str, where: str) -> None:
    hidden = next((c for c in key if not c.isprintable() or unicodedata.category(c) == "Cf"), None)
    if hidden is not None and not hidden.isspace():  # a zero-width space, a control character: a key that
        # looks right and never matches
        raise UserError(f"{where}: holds an invisible or non-printable character (U+{ord(hidden):04X}); "
                        "write the key again as plain text")
    if any(c.isspace() for c in key):
        raise UserError(f"{where}: a key must be one word, without spaces")
    if len(key) < MIN_KEY_CHARS:
        raise UserError(f"{where}: a key must have at least {MIN_KEY_CHARS} characters "
                        "(make one with: openssl rand -hex 32)")


def key_file_warning(path: str | Path) -> str | None:
    """The warning line for a key file that users other than its owner may read (mode & 0o044), or None."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    return (f"warning: --api-key-file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"chmod 600 {path}")


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_keys(path: str | Path | None, environ: Mapping[str, str] = os.environ,
              warn: Callable[[str], None] = _warn) -> Keys:
    """The keys of ``path`` (one per line; blank lines and lines starting with # are ignored; a UTF-8 byte order
    mark at the start is dropped) or, without a path, of ``$CCLD_TRT_API_KEY``; no keys if neither is given. A
    file that cannot be read or holds no key, a key under 16 characters, or a line with an invisible or
    non-printable character (a zero-width space, a control character) is a UserError (which never quotes a
    key): the whole file is refused, so a reload keeps the previous keys. A file others may read is loaded
    with a ``warn`` line."""
    if path is None:
        key = environ.get(KEY_ENV, "").strip()
        if not key:
            return Keys()
        _check_key(key, f"${KEY_ENV}")
        return Keys.of([key])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"--api-key-file {path}: not a text file") from None
    keys = []
    text = text.removeprefix("\ufeff")
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            _check_key(line, f"--api-key-file {path} line {number}")
            keys.append(line)
    if not keys:
        raise UserError(f"--api-key-file {path} holds no key (one per line; blank and # lines are ignored)")
    warning = key_file_warning(path)
    if warning:
        warn(warning)
    return Keys.of(keys)


class KeyFileWatcher:
    """Notices when a key file changes (its modification time, size or inode), so that a running server can
    take the new keys: deleting a client's line revokes it without a restart."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def poll(self) -> Keys | None:
        """The file's keys if it changed since the last poll, else None; UserError if it changed into a file
        without a valid key (the caller keeps the keys it has)."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return load_keys(self.path)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """UserError if ``host`` is not a loopback address and remote access was not explicitly allowed (--listen)."""
    if allow_remote or is_loopback(host):
        return
    raise UserError(f"--host {host} would make the server reachable from other machines; "
                    "add --listen to allow that")


def check_exposure(host: str, listen: bool, keys: Keys, insecure: bool) -> str | None:
    """The host rule of the page and the cluster: a non-loopback ``host`` needs ``listen``, and then ``keys``
    unless ``insecure``. Returns the warning line to log at start (serving beyond loopback without a key), or
    None; raises UserError before anything starts otherwise."""
    check_host(host, listen)
    if keys or is_loopback(host):
        return None
    if not insecure:
        raise UserError(f"--host {host} serves other machines, so it needs a key: --api-key-file FILE or "
                        f"${KEY_ENV} (or --insecure to serve anyone who can reach it)")
    return (f"warning: --insecure: anyone who can reach {host} may use this server, without a key "
            "(and its requests use this machine's accelerator)")


def page_login(keys: Keys) -> Callable[[str, str], bool]:
    """Gradio's ``auth=`` check: any user name, a key as the password."""
    def check(username: str, password: str) -> bool:
        return keys.identify(password or "") is not None

    return check


@dataclass(frozen=True)
class AccessPolicy:
    """Who may use the cluster: ``keys`` (none: anyone who reaches it, named by address), at most
    ``max_in_flight`` requests per client at once (None: no limit), and whether the access log shows prompts."""

    keys: Keys = field(default_factory=Keys)
    max_in_flight: int | None = None
    log_prompts: bool = False

    def validate(self) -> AccessPolicy:
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise UserError(f"--max-in-flight-per-client must be >= 1, got {self.max_in_flight}")
        return self

    def config(self) -> dict[str, Any]:
        """As JSON data (what the cluster's access actor holds: digests and ids only, never a key)."""
        return {"digests": list(self.keys.digests), "ids": list(self.keys.ids), "max_in_flight": self.max_in_flight,
                "log_prompts": self.log_prompts}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AccessPolicy:
        keys = Keys(tuple(config.get("digests", ())), tuple(config.get("ids", ())))
        return cls(keys, config.get("max_in_flight"), bool(config.get("log_prompts", False))).validate()


def default_client_limit(running_slots: int) -> int:
    """The CLI's per-client limit: half the requests the replicas run at once, so one client leaves room."""
    return max(1, running_slots // 2)


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer that ends a request before it runs."""

    status: int
    error: str
    headers: dict[str, str] = field(default_factory=dict)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(keys: Keys, authorization: Sequence[str], query: Mapping[str, str],
                 address: str) -> str | Refusal:
    """The client's name (its key's id; its address when there are no keys), or the refusal: 400 for more than
    one Authorization header (which one a proxy or a server reads differs); 401 without the right bearer key
    (a key in the query string is never read); 400 for a query string next to a right key."""
    if len(authorization) > 1:
        return Refusal(400, "send one Authorization header, not several")
    if not keys:
        return address
    unauthorized = {"WWW-Authenticate": 'Bearer realm="ccld-trt"'}
    token = bearer(authorization[0] if authorization else None)
    if token is None:
        if any(name.lower() in KEY_PARAMS for name in query):
            return Refusal(401, "a key in the URL is refused (URLs are logged): send it as the header "
                                "Authorization: Bearer KEY, and replace that key", unauthorized)
        return Refusal(401, "this server needs a key: send the header Authorization: Bearer KEY", unauthorized)
    client = keys.identify(token)
    if client is None:
        return Refusal(401, "the key is not accepted", unauthorized)
    if query:
        return Refusal(400, "the API takes no query parameters (a key goes in the Authorization header only)")
    return client


def declared_length(values: Sequence[str], limit: int) -> int | Refusal | None:
    """The request's Content-Length headers -> the length (None: not given, the body streams), or the refusal:
    400 if it is not one non-negative number, 413 over ``limit`` bytes (before any of the body is read)."""
    if not values:
        return None
    if len(set(values)) > 1 or not values[0].strip().isdigit() or not values[0].strip().isascii():
        return Refusal(400, "Content-Length must be one number")
    length = int(values[0])
    if length > limit:
        return Refusal(413, f"the body is {length / 2**20:.0f} MiB; the limit is {limit // 2**20} MiB")
    return length


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~:/%[]@+,")


def log_field(value: str) -> str:
    """``value`` as one log field: as is when it is plain (letters, digits, address and path punctuation),
    else JSON-quoted, so that no space, ``=``, quote or line break from a request can forge another field or
    line."""
    return value if value and set(value) <= _PLAIN else json.dumps(value)


def access_line(when: float, client: str, method: str, path: str, status: int, images: int, seconds: float,
                prompts: Any = None) -> str:
    """One request's log line: UTC time, client, route, status, images answered, seconds; the prompts only when
    the operator asked (``prompts`` not None)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"
    line = (f"{stamp} client={log_field(client)} {log_field(method)} {log_field(path)} status={status} "
            f"images={images} seconds={seconds:.3f}")
    if prompts is not None:
        line += f" prompts={json.dumps(prompts, ensure_ascii=False)}"
    return line


class _KeyOnCommandLine(argparse.Action):
    """``--api-key``: refused without echoing it (a command line shows in ``ps``); without this exact option,
    argparse would take it as an abbreviation of --api-key-file and quote the key as a file name."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"a key on the command line is visible to every user of this machine (ps): put it in a file "
                     f"for --api-key-file or in ${KEY_ENV}")


def add_access_args(parser: argparse.ArgumentParser, cluster: bool) -> None:
    """The flags of who may connect (``serve`` and ``cluster``; the per-client limit and prompt logging: the
    cluster's)."""
    parser.add_argument("--api-key", nargs="?", action=_KeyOnCommandLine, help=argparse.SUPPRESS)
    parser.add_argument("--listen", action="store_true",
                        help="allow a --host other machines can reach (then a key is needed, or --insecure)")
    parser.add_argument("--api-key-file", metavar="FILE",
                        help=f"the accepted keys, one per line (blank and # lines ignored; default ${KEY_ENV}); "
                             + ("clients send 'Authorization: Bearer KEY'" if cluster
                                else "the page asks for one as the password (any user name)"))
    parser.add_argument("--insecure", action="store_true",
                        help="with --listen, serve without a key anyone who can reach the port (logs a warning)")
    if cluster:
        parser.add_argument("--max-in-flight-per-client", type=int, metavar="N",
                            help="requests one client (a key, or an address without keys) may have running or "
                                 "queued; more get 429 (default: half of replicas x --max-ongoing)")
        parser.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDR",
                            help="a reverse proxy (address or network) whose X-Forwarded-For names the client "
                                 "(repeatable; default: none, a client is its key or its own address)")
        parser.add_argument("--log-prompts", action="store_true",
                            help="write the prompts into the access log (default: not, prompts can be private)")
