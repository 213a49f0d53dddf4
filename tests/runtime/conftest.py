"""A live coordinator on 127.0.0.1 (port 0) with participants as threads over real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import uvicorn

from cdp_federated.coordinator.service import Coordinator, ServiceConfig, create_app
from cdp_federated.federation.messages import Message
from cdp_federated.participant.http_client import BodyRecorder, CoordinatorClient
from cdp_federated.participant.runner import serve_tasks


@dataclass
class LiveService:
    coordinator: Coordinator
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread
    stop: threading.Event = field(default_factory=threading.Event)
    workers: list[threading.Thread] = field(default_factory=list)
    clients: list[CoordinatorClient] = field(default_factory=list)

    def client(self, name: str, role: str = "participant", **kwargs) -> CoordinatorClient:
        """A client enrolled as ``name`` with ``role`` (secret created and redeemed)."""
        secret = self.coordinator.registry.create(name, role)
        client = CoordinatorClient(self.base_url, timeout=10.0, **kwargs)
        client.enrol(secret)
        self.clients.append(client)
        return client

    def participant(
        self,
        name: str,
        handler: Callable[[Message], Message],
        *,
        recorder: BodyRecorder | None = None,
    ) -> CoordinatorClient:
        """Enrol ``name`` and serve its tasks with ``handler`` on a thread until teardown."""
        client = self.client(name, recorder=recorder)
        worker = threading.Thread(
            target=serve_tasks,
            args=(client, name, handler),
            kwargs={"stop": self.stop, "poll_wait": 1.0},
            name=f"participant-{name}",
            daemon=True,
        )
        worker.start()
        self.workers.append(worker)
        return client

    def close(self) -> None:
        self.stop.set()
        self.coordinator.runner.shutdown(timeout=5)
        for worker in self.workers:
            worker.join(5)
        for client in self.clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.coordinator.store.dispose()


def start_service(db_url: str, key_dir, **settings) -> LiveService:
    config = ServiceConfig(db_url=db_url, key_dir=key_dir, recheck_seconds=0.2, **settings)
    coordinator = Coordinator.open(config)
    app = create_app(coordinator=coordinator)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(target=server.run, name="coordinator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the coordinator did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveService(coordinator, f"http://127.0.0.1:{port}", server, thread)


@pytest.fixture
def live(tmp_path) -> Iterator[LiveService]:
    service = start_service(f"sqlite:///{tmp_path / 'coordinator.sqlite'}", tmp_path / "keys")
    try:
        yield service
    finally:
        service.close()
