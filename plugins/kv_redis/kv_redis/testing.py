"""Throwaway ``redis-server`` processes for tests, benchmarks and demos.

:class:`RedisServer` runs one server on a free loopback port in a directory of its
own; :class:`RedisClusterServers` runs ``masters`` cluster-enabled servers and joins
them with ``redis-cli --cluster create``.  Both persist nothing (``save ""``,
``appendonly no``), answer only on 127.0.0.1, and are stopped by ``stop()`` or on
leaving their ``with`` block.  Fault injection: ``kill()`` (SIGKILL), ``pause()`` /
``resume()`` (SIGSTOP / SIGCONT: a server that accepts connections and never answers).

Needs the ``redis-server`` and ``redis-cli`` binaries (Debian: ``apt-get install -y
redis-server``); :func:`find_redis_server` returns ``None`` when they are missing and
:data:`INSTALL_HINT` says how to get them.  ``RedisServer(..., tls=True)`` serves TLS
only, with a throwaway CA and client certificates made by the ``openssl`` command
(:func:`make_tls_files`), and requires clients to present one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INSTALL_HINT", "RedisClusterServers", "RedisServer", "TlsFiles", "find_redis_server",
           "free_port", "make_tls_files"]

INSTALL_HINT = "apt-get install -y redis-server   (or: sudo apt-get install -y redis-server)"
_START_TIMEOUT_S = 15.0


def find_redis_server() -> tuple[str, str] | None:
    """Paths of ``redis-server`` and ``redis-cli``, or ``None`` if either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


def free_port(avoid: Sequence[int] = ()) -> int:
    """A TCP port free on 127.0.0.1 right now (not in ``avoid``)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and the server / client certificates it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: str | os.PathLike[str], name: str = "kvcore-test") -> TlsFiles:
    """Make a CA and a server certificate for 127.0.0.1 / localhost and a client
    certificate with the ``openssl`` command.  Raises ``FileNotFoundError`` without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl not found; apt-get install -y openssl")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", f"/CN={name}-ca")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out",
            f"{who}.csr", "-subj", f"/CN={name}-{who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", "-extfile", "san.cnf")
    return TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
                    d / "client.key")


def _ping(port: int, password: str | None = None, timeout: float = 0.2) -> bool:
    """A raw RESP PING, so this module needs no client library."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], *, port: int | None = None,
                 password: str | None = None, args: Sequence[str] = (),
                 tls: bool = False) -> None:
        found = find_redis_server()
        if found is None:
            raise FileNotFoundError(f"redis-server / redis-cli not found; {INSTALL_HINT}")
        self.server_path, self.cli_path = found
        self.directory = Path(directory)
        self.port = port or free_port()
        self.password = password
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.tls = make_tls_files(self.directory / "tls") if tls else None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        t = self.tls
        return (f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={t.ca}"
                f"&ssl_certfile={t.client_cert}&ssl_keyfile={t.client_key}")

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def command(self) -> list[str]:
        cmd = [self.server_path, "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.directory), "--save", "", "--appendonly", "no",
               "--daemonize", "no", "--logfile", str(self.log),
               "--enable-debug-command", "local"]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.tls is not None:
            t = self.tls
            cmd[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", str(t.server_cert), "--tls-key-file", str(t.server_key),
                    "--tls-ca-cert-file", str(t.ca), "--tls-auth-clients", "yes"]
        return cmd + self.args

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        if self.tls is None:
            return _ping(self.port, self.password)
        t = self.tls
        cmd = [self.cli_path, "--tls", "--cacert", str(t.ca), "--cert", str(t.client_cert),
               "--key", str(t.client_key), "-p", str(self.port), "ping"]
        if self.password:
            cmd[1:1] = ["-a", self.password, "--no-auth-warning"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() == "PONG"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (resuming a paused server first), then SIGKILL after 5 s."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: the server dies without a word, as a crashed machine would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing answers."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServers:
    """``masters`` cluster-enabled servers joined into one Redis Cluster, no replicas.

    Configured the way kvcore recommends for a cache: ``cluster-require-full-coverage
    no`` and ``cluster-allow-reads-when-down yes`` (a dead master costs its own keys
    only), ``cluster-node-timeout`` ``node_timeout_ms`` (short, so tests see a failure
    detected in about a second)."""

    def __init__(self, directory: str | os.PathLike[str], *, masters: int = 3,
                 node_timeout_ms: int = 1000, password: str | None = None) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        self.directory = Path(directory)
        self.password = password
        used: list[int] = []
        self.nodes: list[RedisServer] = []
        for i in range(masters):
            port = free_port(used)
            bus = free_port(used + [port])
            used += [port, bus]
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(bus),
                    "--cluster-require-full-coverage", "no",
                    "--cluster-allow-reads-when-down", "yes"]
            if password:
                args += ["--masterauth", password]
            self.nodes.append(RedisServer(self.directory / f"node{i}", port=port,
                                          password=password, args=args))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{auth}{hosts}"

    def start(self) -> RedisClusterServers:
        try:
            for node in self.nodes:
                node.start()
            cmd = [self.nodes[0].cli_path]
            if self.password:
                cmd += ["-a", self.password, "--no-auth-warning"]
            cmd += ["--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                    "--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n"
                                   f"{done.stderr}")
            self.wait_state("ok")
        except BaseException:
            self.stop()
            raise
        return self

    def cluster_info(self, node: RedisServer) -> dict[str, str]:
        cmd = [node.cli_path, "-p", str(node.port)]
        if self.password:
            cmd += ["-a", self.password, "--no-auth-warning"]
        out = subprocess.run(cmd + ["cluster", "info"], capture_output=True, text=True,
                             timeout=10).stdout
        return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)

    def wait_state(self, state: str, timeout: float = _START_TIMEOUT_S) -> None:
        """Wait until every running node reports ``cluster_state:<state>``."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self.cluster_info(n).get("cluster_state") for n in self.nodes if n.running]
            if states and all(s == state for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not reach state {state!r}: {states}")
            time.sleep(0.05)

    def wait_node_failed(self, dead: RedisServer, timeout: float = 15.0) -> None:
        """Wait until every live node has marked ``dead`` as failed (``fail`` flag)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = []
            for node in self.nodes:
                if not node.running:
                    continue
                cmd = [node.cli_path, "-p", str(node.port)]
                if self.password:
                    cmd += ["-a", self.password, "--no-auth-warning"]
                out = subprocess.run(cmd + ["cluster", "nodes"], capture_output=True,
                                     text=True, timeout=10).stdout
                line = next((x for x in out.splitlines() if f":{dead.port}@" in x), "")
                seen.append("fail" in line.split()[2].split(",") if line else False)
            if seen and all(seen):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {dead.port} was not marked failed: {seen}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
