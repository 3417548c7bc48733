"""The gateway in front of the vLLM servers: a stable model name mapped to versioned adapter names.

With ``serving.rollout: switch`` or ``canary`` every adapter version is loaded on the vLLM
servers under its own immutable name (``<served>-<version>``, :func:`version_name`), and the
name clients call (``<served>``) is an alias held by a gateway, which rewrites the request's
``model`` to one of the versions by weight. A version's weights never change under a request
in flight, so no answer mixes two adapters (which an in-place reload can do), and a rollback
is a change of weights, not a load.

The gateway here is nginx with its JavaScript module (njs; Debian: ``nginx-light
libnginx-mod-http-js``): tuneloop renders its config (:func:`render_nginx_conf`), starts and
stops it (:class:`NginxGateway`), and drives it through a JSON route table that it rewrites
atomically (:class:`RouteTable`) and that njs reads on every request, so a flip takes effect
on the next request without a reload. nginx's access log (JSON lines, one per request) names
the version that answered, its status and time, and, for a version being baked, a sample of
its answers (:func:`read_access_log`). The response's ``model`` field and its
``X-Tuneloop-Version`` header name the version too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.serving.adapters import check_lora_name

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

NJS_SCRIPT = Path(__file__).with_name("nginx") / "tuneloop_gateway.js"
NJS_MODULE_CANDIDATES = (
    "/usr/lib/nginx/modules/ngx_http_js_module.so",  # Debian, Ubuntu
    "/usr/lib64/nginx/modules/ngx_http_js_module.so",  # RHEL, Fedora
    "/etc/nginx/modules/ngx_http_js_module.so",  # nginx.org packages
)
VERSION_HEADER = "X-Tuneloop-Version"
INSTALL_HINT = "install nginx with its JavaScript module (Debian/Ubuntu: apt-get install nginx-light libnginx-mod-http-js)"


class GatewayError(RuntimeError):
    """The gateway cannot be configured, started or read; the message says what to do."""


def version_name(served_name: str, version: str) -> str:
    """The immutable name ``version`` of the adapter serves under: ``<served>-<version>``."""
    return check_lora_name(f"{served_name}-{version}")


# -- the route table ------------------------------------------------------------------------


@dataclass
class Alias:
    """What one stable name maps to: versions with weights (percent or any non-negative
    numbers), the share of each version's answers to log, and the version to fall back to."""

    routes: dict[str, float] = field(default_factory=dict)
    capture: dict[str, float] = field(default_factory=dict)
    last_known_good: str | None = None

    def serving(self) -> list[str]:
        """Versions with a positive weight, heaviest first."""
        return [name for name, weight in sorted(self.routes.items(), key=lambda kv: -kv[1]) if weight > 0]


class RouteTable:
    """The JSON file the gateway routes by. Every change is written to a temporary file and
    renamed over the old one, so the gateway reads either the old table or the new one.

    One writer at a time: rollouts hold the fleet lease (:mod:`tuneloop.serving.fleet_lock`).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"aliases": {}, "upstreams": [], "generation": 0}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise GatewayError(f"the gateway route table {self.path} is unreadable ({err}); fix or delete it and run `tuneloop reconcile`") from err
        if not isinstance(data, dict):
            raise GatewayError(f"the gateway route table {self.path} is not a JSON object")
        data.setdefault("aliases", {})
        data.setdefault("upstreams", [])
        data.setdefault("generation", 0)
        return data

    def alias(self, name: str) -> Alias:
        entry = self.read()["aliases"].get(name) or {}
        return Alias(
            routes={str(r["name"]): float(r["weight"]) for r in entry.get("routes", [])},
            capture={str(k): float(v) for k, v in (entry.get("capture") or {}).items()},
            last_known_good=entry.get("last_known_good"),
        )

    def upstreams(self) -> list[str]:
        return [str(u) for u in self.read()["upstreams"]]

    def _write(self, data: dict[str, Any]) -> None:
        data["generation"] = int(data.get("generation", 0)) + 1
        data["updated_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def set_alias(
        self,
        name: str,
        routes: Mapping[str, float],
        *,
        capture: Mapping[str, float] | None = None,
        last_known_good: str | None = None,
    ) -> None:
        """Route ``name`` to ``routes`` ({version name: weight}); the previous ``capture`` and
        ``last_known_good`` are kept unless given."""
        if not routes or all(w <= 0 for w in routes.values()):
            raise GatewayError(f"alias {name!r} needs at least one version with a positive weight, got {dict(routes)}")
        if any(w < 0 for w in routes.values()):
            raise GatewayError(f"weights must not be negative: {dict(routes)}")
        for version in routes:
            check_lora_name(version)
        data = self.read()
        old = data["aliases"].get(name) or {}
        data["aliases"][name] = {
            "routes": [{"name": v, "weight": w} for v, w in routes.items()],
            "capture": dict(capture) if capture is not None else old.get("capture", {}),
            "last_known_good": last_known_good if last_known_good is not None else old.get("last_known_good"),
        }
        self._write(data)

    def remove_alias(self, name: str) -> None:
        data = self.read()
        if data["aliases"].pop(name, None) is not None:
            self._write(data)

    def set_upstreams(self, urls: Sequence[str]) -> None:
        """The replicas the gateway may route to (``host:port``; scheme and path dropped):
        only those that serve every version the aliases name (see ``reconcile``)."""
        data = self.read()
        data["upstreams"] = [hostport(u) for u in urls]
        self._write(data)


def hostport(url: str) -> str:
    """``http://127.0.0.1:8000/`` -> ``127.0.0.1:8000`` (what nginx connects to)."""
    rest = url.split("://", 1)[-1].strip("/")
    if not rest or "/" in rest:
        raise GatewayError(f"a vLLM endpoint for the gateway must be http://host:port, got {url!r}")
    return rest


# -- nginx ----------------------------------------------------------------------------------


def find_njs_module(explicit: str | None = None) -> str:
    for candidate in ([explicit] if explicit else []) + list(NJS_MODULE_CANDIDATES):
        if candidate and Path(candidate).is_file():
            return candidate
    raise GatewayError(f"nginx's JavaScript module (ngx_http_js_module.so) was not found in {list(NJS_MODULE_CANDIDATES)}: {INSTALL_HINT}")


def nginx_available() -> bool:
    """nginx and its JavaScript module are installed (what the gateway needs)."""
    try:
        find_nginx()
        find_njs_module()
    except GatewayError:
        return False
    return True


def find_nginx(explicit: str | None = None) -> str:
    found = explicit or shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if not found:
        raise GatewayError(f"nginx is not installed: {INSTALL_HINT}")
    return found


LOG_FORMAT = (
    '{"msec":$msec,"alias":"$tl_alias","version":"$tl_version","status":$status,'
    '"request_time":$request_time,"upstream":"$upstream_addr","uri":"$uri","answer":"$tl_answer","request":"$tl_request"}'
)


def render_nginx_conf(
    *,
    run_dir: str | os.PathLike[str],
    listen: str,
    routes_file: str | os.PathLike[str],
    njs_module: str,
    access_log: str | os.PathLike[str] | None = None,
    workers: int = 1,
    read_timeout_s: int = 600,
) -> str:
    """nginx.conf for the gateway: everything (pid, logs, temp files) under ``run_dir``."""
    run = Path(run_dir).resolve()
    retries = "\n".join(
        f"""        location @retry{i} {{
            js_body_filter gw.capture;
            proxy_set_body $tl_body;
            proxy_pass http://$tl_retry{i};
{'            proxy_intercept_errors on;' + chr(10) + f'            error_page 404 500 502 503 = @retry{i + 1};' + chr(10) if i < 3 else ''}            add_header {VERSION_HEADER} $tl_version always;
        }}"""
        for i in (1, 2, 3)
    )
    user = "user root root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {run / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# rendered by tuneloop (tuneloop.serving.gateway); do not edit, it is rewritten at start
load_module {njs_module};
{user}worker_processes {workers};
pid {run / 'nginx.pid'};
error_log {run / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
{temp}
    js_path {NJS_SCRIPT.parent};
    js_import gw from {NJS_SCRIPT.name};
    js_var $tl_routes_file {Path(routes_file).resolve()};
    js_var $tl_alias "";
    js_var $tl_version "";
    js_var $tl_capture "0";
    js_var $tl_answer "";
    js_var $tl_request "";
    js_set $tl_upstream gw.upstream;
    js_set $tl_retry1 gw.retry;  # one variable per try: njs caches a variable's value per request
    js_set $tl_retry2 gw.retry;
    js_set $tl_retry3 gw.retry;
    js_set $tl_body gw.body;
    log_format tuneloop escape=json '{LOG_FORMAT}';
    access_log {Path(access_log).resolve() if access_log else run / 'access.log'} tuneloop;
    server {{
        listen {listen};
        client_max_body_size 8m;
        client_body_buffer_size 8m;
        client_body_in_single_buffer on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout {read_timeout_s}s;
        recursive_error_pages on;
        location ~ ^/v1/(chat/completions|completions)$ {{
            js_body_filter gw.capture;
            proxy_set_body $tl_body;
            proxy_pass http://$tl_upstream;
            proxy_intercept_errors on;
            error_page 404 500 502 503 = @retry1;
            add_header {VERSION_HEADER} $tl_version always;
        }}
        # on another replica: the last did not hold the version (404: restarted and not yet
        # reconciled), failed it (500: a server stopping mid-request) or did not answer (502, 503).
        # Up to three more tries (an inference request has no side effect); the last answer,
        # whatever it is, goes back.
{retries}
        location = /__tuneloop/health {{
            access_log off;
            return 200 "ok";
        }}
        location / {{
            proxy_pass http://$tl_upstream;
        }}
    }}
}}
"""


class NginxGateway:
    """A local nginx gateway process: ``start()``, ``stop()``, its ``url`` and route table.

    ``run_dir`` holds nginx.conf, the pid file, the logs and the route table
    (``routes.json``), unless ``routes_file`` / ``access_log`` are given.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 8088,
        routes_file: str | os.PathLike[str] | None = None,
        access_log: str | os.PathLike[str] | None = None,
        nginx: str | None = None,
        njs_module: str | None = None,
        workers: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.host, self.port, self.workers = host, port, workers
        self.routes = RouteTable(routes_file or self.run_dir / "routes.json")
        self.access_log = Path(access_log).resolve() if access_log else self.run_dir / "access.log"
        self._nginx, self._njs_module = nginx, njs_module

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def conf(self) -> Path:
        return self.run_dir / "nginx.conf"

    def pid(self) -> int | None:
        try:
            pid = int((self.run_dir / "nginx.pid").read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def write_conf(self) -> Path:
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.run_dir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            render_nginx_conf(
                run_dir=self.run_dir,
                listen=f"{self.host}:{self.port}",
                routes_file=self.routes.path,
                access_log=self.access_log,
                njs_module=find_njs_module(self._njs_module),
                workers=self.workers,
            )
        )
        return self.conf

    def _nginx_cmd(self, *args: str) -> list[str]:
        return [find_nginx(self._nginx), "-p", str(self.run_dir), "-c", str(self.conf), *args]

    def start(self, timeout_s: float = 10.0) -> None:
        """Write the config, check it (``nginx -t``), start nginx and wait until it answers.
        A gateway already running from this ``run_dir`` is reloaded instead."""
        import httpx

        self.write_conf()
        if not self.routes.path.is_file():
            self.routes.set_upstreams([])
        test = subprocess.run(self._nginx_cmd("-t", "-q"), capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise GatewayError(f"nginx rejected the gateway config {self.conf}: {test.stderr.strip()}")
        if self.pid() is not None:
            subprocess.run(self._nginx_cmd("-s", "reload"), capture_output=True, text=True, check=True)
            return
        started = subprocess.run(self._nginx_cmd(), capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise GatewayError(f"nginx did not start on {self.host}:{self.port}: {started.stderr.strip()} (is the port in use?)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/__tuneloop/health", timeout=1.0).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise GatewayError(f"nginx started but {self.url} does not answer after {timeout_s:.0f} s; see {self.run_dir / 'error.log'}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (requests in flight finish), then a hard one after ``timeout_s``."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            os.kill(pid, signal.SIGTERM)


# -- the access log -------------------------------------------------------------------------


@dataclass
class LogRecord:
    """One request through the gateway."""

    msec: float
    alias: str
    version: str
    status: int
    seconds: float
    answer: str = ""
    request: str = ""  # a captured answer's request: JSON of its messages (or prompt), max_tokens, temperature


def read_access_log(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[LogRecord], int]:
    """The records written to ``path`` from byte ``offset`` on, and the offset after the last
    complete line (a line being written is left for the next read)."""
    p = Path(path)
    if not p.is_file():
        return [], offset
    with open(p, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n") + 1
    records: list[LogRecord] = []
    for line in chunk[:end].splitlines():
        try:
            raw = json.loads(line)
            records.append(
                LogRecord(
                    msec=float(raw["msec"]),
                    alias=str(raw.get("alias", "")),
                    version=str(raw.get("version", "")),
                    status=int(raw["status"]),
                    seconds=float(raw.get("request_time") or 0.0),
                    answer=str(raw.get("answer", "")),
                    request=str(raw.get("request", "")),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue  # a line of another format (an older config): not ours to judge
    return records, offset + end
