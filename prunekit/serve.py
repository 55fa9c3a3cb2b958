"""`prunekit serve`: uvicorn; with several API processes, each listens on a socket of its own (SO_REUSEPORT).

uvicorn's own multi-process mode shares one listening socket, and asyncio accepts every connection waiting on it
at each wake-up: clients that connect together (a deploy, a load balancer's pool, a benchmark) all land on the
one process that woke first, and the others idle. With a socket per process, the kernel spreads new connections
over them by the hash of each connection's addresses.
"""

from __future__ import annotations

import socket

import uvicorn
from uvicorn.supervisors import multiprocess

APP = "app.main:create_served_app"


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class OwnSocketProcess(multiprocess.Process):
    """A uvicorn worker process that binds its own socket when it starts (again when the supervisor replaces it)."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        super().target([reuse_port_socket(self.config.host, self.config.port)])


def serve(workers: int, host: str, port: int, log_level: str) -> None:
    options = {"factory": True, "host": host, "port": port, "log_level": log_level, "proxy_headers": True,
               "log_config": None}
    if workers == 1:
        uvicorn.run(APP, **options)  # type: ignore[arg-type]
        return
    config = uvicorn.Config(APP, workers=workers, **options)  # type: ignore[arg-type]
    # The supervisor (health checks, restarts, signals) is uvicorn's; only the processes it starts differ. The
    # parent binds nothing, so no socket of its own holds connections that no process accepts.
    multiprocess.Process = OwnSocketProcess  # type: ignore[misc]
    multiprocess.Multiprocess(config, sockets=[]).run()
