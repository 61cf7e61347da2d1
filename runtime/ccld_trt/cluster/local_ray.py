"""The local Ray that ``ccld-trt cluster`` starts when it joins none: loopback only, token auth, private files.

What Ray 2.60 does by default on Linux, and what is changed here (read from the installed Ray's source):

- ``ray.init(_node_ip_address="127.0.0.1")`` is swapped for the machine's address (``resolve_ip_for_localhost``
  asks ``get_node_ip_address``, which looks beyond loopback unless ``ray_constants.ENABLE_RAY_CLUSTER`` is
  false). With that constant false while Ray starts, the node address stays 127.0.0.1; the GCS, the raylet,
  the object manager, every worker's gRPC server, the dashboard and runtime-env agents and the metrics
  exporter then bind to loopback (the C++ servers listen on 127.0.0.1 only when the node address is it).
- Serve's replicas open an inter-deployment gRPC server on ``[::]:0`` whatever the node address is (hard-coded
  in ``ray.serve._private.replica``): ``bind_serve_grpc_to_loopback``, called by our deployments' constructors
  (which Serve runs before it starts that server), makes it ``127.0.0.1:0`` when the node address is loopback.
- Token auth: Ray turns it on by default for a new local cluster and writes a token to ``~/.ray/auth_token``
  (mode 0644, kept forever). Here the token is ours, random, in a private directory (0600 file in a 0700
  directory, named by ``RAY_AUTH_TOKEN_PATH``); ``RAY_AUTH_MODE=disabled`` is refused unless ``--insecure``.
- Ray makes its session directory 0777 with 0644 files: it lives under our 0700 directory, and Ray's
  processes start with umask 077; the directory (token, sockets, session, logs) is removed when the cluster
  stops, unless the operator keeps it (``--keep-ray-logs``: then only the token is removed).
- Serve's HTTP proxy (uvicorn) believes ``X-Forwarded-For`` from the addresses in ``$FORWARDED_ALLOW_IPS``
  (default: loopback, so any local client could name itself anything): set to the ``--trusted-proxy``
  addresses, or to nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ccld_trt.access import KEY_ENV
from ccld_trt.export.errors import UserError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
FORWARDED_ENV = "FORWARDED_ALLOW_IPS"  # uvicorn's (Serve's proxy): whose X-Forwarded-For is believed
LOOPBACK = "127.0.0.1"


def check_auth_mode(environ: Mapping[str, str], insecure: bool) -> str | None:
    """UserError if Ray's token auth is turned off (``RAY_AUTH_MODE=disabled``) without ``insecure``; the
    warning line to log when it is off with ``insecure``; None when it is on."""
    if environ.get(AUTH_MODE_ENV, "").strip().lower() != "disabled":
        return None
    if not insecure:
        raise UserError(f"{AUTH_MODE_ENV}=disabled turns off Ray's token auth: then anything that reaches a Ray "
                        "port can run code as this user; unset it (or add --insecure)")
    return (f"warning: --insecure with {AUTH_MODE_ENV}=disabled: Ray's ports take jobs from anyone who reaches "
            "them (loopback only here: every user of this machine)")


def trusted_proxies(values: Iterable[str]) -> tuple[str, ...]:
    """``--trusted-proxy`` values (addresses or networks, e.g. 10.0.0.5, 10.0.0.0/24) checked and normalised;
    UserError naming a bad one."""
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise UserError(f"--trusted-proxy {value!r} is not an IP address or network") from None
    return tuple(out)


def is_loopback_address(host: str) -> bool:
    """Whether a listening address is reachable from this machine only (IPv4-mapped IPv6 included)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@contextlib.contextmanager
def _loopback_node_address(ray: Any) -> Iterator[None]:
    constants = ray._private.ray_constants
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False  # keeps "127.0.0.1" from being swapped for the machine's address
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def _reload_auth(ray: Any) -> None:
    """Make this process see the auth settings of its environment now: Ray caches its config (where the auth
    mode is) and the token it found (as Ray's own ``_enable_token_auth`` does)."""
    with contextlib.suppress(Exception):
        ray._raylet.Config.initialize("")
    with contextlib.suppress(Exception):
        ray._raylet.AuthenticationTokenLoader.instance().reset_cache()


class LocalRay:
    """A private local Ray: ``start`` it, then ``close`` it after ``ray.shutdown()``. Owns its directory
    (``root``, 0700: the token and Ray's temp dir) and the environment variables it set in this process."""

    def __init__(self, root: str | os.PathLike[str] | None = None, keep_logs: bool = False,
                 trusted: Iterable[str] = ()) -> None:
        self.owned = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="ccld-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.root.chmod(0o700)
        self.ray_dir = self.root / "r"  # Ray chmods its temp dir 0777: that one sits inside ours
        self.token = self.root / "auth_token"
        self.keep_logs = keep_logs
        self.trusted = tuple(trusted)
        self._saved_env: dict[str, str | None] = {}

    def _set_env(self, environ: MutableMapping[str, str], name: str, value: str) -> None:
        self._saved_env.setdefault(name, environ.get(name))
        environ[name] = value

    def start(self, num_cpus: int | None, namespace: str, insecure: bool = False) -> None:
        """``ray.init`` a new local Ray as described in the module docstring; raises UserError (nothing
        started) if token auth is off without ``insecure``."""
        import ray

        check_auth_mode(os.environ, insecure)
        fd = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        if os.environ.get(AUTH_MODE_ENV, "").strip().lower() != "disabled":
            self._set_env(os.environ, AUTH_MODE_ENV, "token")
        self._set_env(os.environ, TOKEN_PATH_ENV, str(self.token))
        self._set_env(os.environ, FORWARDED_ENV, ",".join(self.trusted))  # "": believe nobody's X-Forwarded-For
        _reload_auth(ray)
        mask = os.umask(0o077)  # Ray's processes inherit it: their files are 0600
        try:
            with _loopback_node_address(ray):
                ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(self.ray_dir),
                         _node_ip_address=LOOPBACK, namespace=namespace, log_to_driver=False,
                         configure_logging=False)
        finally:
            os.umask(mask)

    def close(self) -> None:
        """After ``ray.shutdown()``: the token goes, and the directory unless logs are kept; the environment
        is restored."""
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        import ray

        _reload_auth(ray)
        self.token.unlink(missing_ok=True)
        if self.keep_logs:
            return
        if self.owned:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            shutil.rmtree(self.ray_dir, ignore_errors=True)


def forget_env_key(environ: MutableMapping[str, str] = os.environ) -> None:
    """Remove the API key from this process's environment before Ray starts processes (they copy it): the
    ingress holds its digest, nothing needs the key itself."""
    environ.pop(KEY_ENV, None)


def bind_serve_grpc_to_loopback() -> None:
    """In a Serve replica's process, before Serve opens the replica's inter-deployment gRPC server: make it
    listen on 127.0.0.1 when this node's address is loopback (Serve hard-codes ``[::]:0``). A no-op elsewhere
    (a node of a real cluster must be reachable by the others)."""
    try:
        import ray
        from ray.serve._private import replica
    except ImportError:
        return
    if not is_loopback_address(ray.util.get_node_ip_address()):
        return
    add_port = getattr(replica, "add_port_to_grpc_server", None)  # Ray 2.60's name (tests/test_cluster_exposure.py
    if add_port is None or getattr(add_port, "ccld_loopback", False):  # fails if another version binds elsewhere)
        return

    def loopback_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = LOOPBACK + address[len("[::]"):]
        return int(add_port(server, address))

    loopback_port.ccld_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback_port
