"""``cdp-fl coordinator|participant|job``: the federation as separate processes over HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..errors import ConfigError
from . import app

coordinator_app = typer.Typer(
    help="Run the coordinator service and enrol participants.", no_args_is_help=True
)
participant_app = typer.Typer(help="Run a participant against a coordinator.", no_args_is_help=True)
job_app = typer.Typer(help="Submit federated jobs and follow them.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(participant_app, name="participant")
app.add_typer(job_app, name="job")

ConfigOption = Annotated[Path, typer.Option("--config", help="YAML configuration file.")]
CoordinatorOption = Annotated[
    str | None, typer.Option("--coordinator", help="Coordinator URL (overrides the config's).")
]


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", field="--config", value=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError("configuration must be a mapping", field="--config", value=str(path))
    return data


# Server options (not ServiceConfig fields): where to listen, TLS, and the leader lease.
_SERVER_KEYS = ("host", "port", "tls_cert", "tls_key", "lease", "lease_seconds", "advertise_url")


def _coordinator_settings(path: Path) -> tuple[Any, dict[str, Any]]:
    """The :class:`ServiceConfig` and the server options (host, port, TLS) from a YAML file."""
    from ..coordinator.service import ServiceConfig
    from ..settings import normalize_db_url

    data = _yaml(path)
    base = path.resolve().parent
    server = {k: data.pop(k) for k in _SERVER_KEYS if k in data}
    known = {f.name for f in fields(ServiceConfig)} | {"db"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown coordinator setting(s): {', '.join(unknown)}",
            field="--config",
            value=unknown[0],
            fix=f"use {', '.join(_SERVER_KEYS)} and {', '.join(sorted(known))}",
        )
    db = str(data.pop("db", data.pop("db_url", "coordinator.sqlite")))
    if "://" not in db and not Path(db).is_absolute():
        db = str(base / db)
    key_dir = Path(str(data.pop("key_dir", "coordinator-keys"))).expanduser()
    for name in ("tls_cert", "tls_key"):
        if server.get(name) and not Path(server[name]).is_absolute():
            server[name] = str(base / server[name])
    config = ServiceConfig(
        db_url=normalize_db_url(db),
        key_dir=key_dir if key_dir.is_absolute() else base / key_dir,
        **data,
    )
    return config, server


@coordinator_app.command("serve")
def coordinator_serve(
    config: ConfigOption = Path("coordinator.yaml"),
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (0: any free port).")] = None,
    port_file: Annotated[
        Path | None, typer.Option(help="Write the bound port here once serving.")
    ] = None,
) -> None:
    """Serve the coordinator's HTTP API (jobs, tasks, enrolment, JWKS) until interrupted.

    Several coordinators may share one database: the one holding the leader lease runs the jobs,
    the others serve the API from the database as standbys and take over when the leader's lease
    expires (``lease_seconds``, default 15; ``lease: false`` for a single process without one)."""
    from contextlib import asynccontextmanager

    import uvicorn
    from starlette.concurrency import run_in_threadpool

    from ..coordinator.lease import DEFAULT_LEASE_SECONDS, LeaderLease, lead_with_lease
    from ..coordinator.service import Coordinator, create_app

    service, server_opts = _coordinator_settings(config)
    bind = host or server_opts.get("host") or "127.0.0.1"
    port = port if port is not None else int(server_opts.get("port", 8700))
    if bool(server_opts.get("tls_cert")) != bool(server_opts.get("tls_key")):
        raise ConfigError("give both tls_cert and tls_key, or neither", field="tls_cert")
    use_lease = server_opts.get("lease", True)
    if not isinstance(use_lease, bool):
        raise ConfigError("lease must be true or false", field="lease", value=use_lease)
    coordinator = Coordinator.open(service, recover=not use_lease)
    lease = keeper = None
    if use_lease:
        lease = LeaderLease(
            coordinator.store,
            seconds=server_opts.get("lease_seconds", DEFAULT_LEASE_SECONDS),
            address=server_opts.get("advertise_url"),
        )
        keeper = lead_with_lease(coordinator, lease)  # leads at once if the lease is free
        role = "leader" if keeper.leading else "standby"
        typer.echo(f"coordinator {role} (lease token {lease.token})", err=True)
    application = create_app(coordinator=coordinator)
    stopped = threading.Event()

    def stop() -> None:
        """Jobs stop before the lease goes (nothing half-done), then a standby may take over at
        its next look. Runs in the app's shutdown: uvicorn re-raises SIGTERM/SIGINT once it has
        served, so nothing after ``server.run()`` would run then."""
        if stopped.is_set():
            return
        stopped.set()
        coordinator.runner.shutdown()
        if keeper is not None:
            keeper.stop(release=True)
        coordinator.store.dispose()

    app_lifespan = application.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with app_lifespan(app) as state:
            yield state
        await run_in_threadpool(stop)

    application.router.lifespan_context = lifespan
    server = uvicorn.Server(
        uvicorn.Config(
            application,
            host=bind,
            port=port,
            log_level="warning",
            lifespan="on",
            ssl_certfile=server_opts.get("tls_cert"),
            ssl_keyfile=server_opts.get("tls_key"),
            timeout_graceful_shutdown=5,
        )
    )

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if not server.started:
            return
        bound = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if server_opts.get("tls_cert") else "http"
        if lease is not None and lease.address is None:
            lease.address = f"{scheme}://{bind}:{bound}"  # what a standby's 503 names
            if lease.token is not None:
                lease.renew()
        if port_file is not None:
            tmp = port_file.with_suffix(port_file.suffix + ".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)
        typer.echo(f"coordinator listening on {scheme}://{bind}:{bound}", err=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    finally:
        stop()  # when the server ended without a signal (or never started)


@coordinator_app.command("enrol")
def coordinator_enrol(
    name: Annotated[str, typer.Argument(help="Participant id to enrol.")],
    role: Annotated[str, typer.Option(help="participant, admin or observer.")] = "participant",
    config: ConfigOption = Path("coordinator.yaml"),
    ttl_hours: Annotated[float, typer.Option(help="How long the secret is valid.")] = 24.0,
    out: Annotated[
        Path | None, typer.Option(help="Write the secret to this file (mode 0600).")
    ] = None,
) -> None:
    """Create a one-time enrolment secret for NAME and print it (shown once)."""
    import os

    from ..coordinator.enrolment import EnrolmentRegistry
    from ..coordinator.schema import open_coordinator_store

    service, _ = _coordinator_settings(config)
    store = open_coordinator_store(service.db_url, create=True)
    try:
        secret = EnrolmentRegistry(store).create(name, role, ttl=timedelta(hours=ttl_hours))
    finally:
        store.dispose()
    if out is None:
        typer.echo(secret)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    typer.echo(f"enrolment secret for {name} ({role}) written to {out}", err=True)


@participant_app.command("run")
def participant_run(
    config: ConfigOption = Path("participant.yaml"),
    once: Annotated[
        bool, typer.Option("--once", help="Exit after the first job served has finished.")
    ] = False,
    coordinator: Annotated[
        str | None, typer.Option(help="Coordinator URL (overrides the config's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Enrol (or reuse the saved token) and serve the coordinator's tasks from local data."""
    from ..participant.runner import load_participant_config, run_participant

    settings = load_participant_config(config, coordinator_url=coordinator)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    err = Console(stderr=True)
    err.print(f"participant {settings.participant_id} polling {settings.coordinator_url}")
    summary = run_participant(
        settings,
        stop=stop,
        once=once,
        on_job_finished=lambda job, status: err.print(f"job {job} {status}"),
    )
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        err.print(
            f"served {summary['tasks']} task(s), {summary['failures']} failed, "
            f"{summary['retries']} retries"
        )


def _client(config: Path, coordinator: str | None = None):
    from ..participant.runner import ClientConfig, connect, load_config

    return connect(load_config(ClientConfig, config, coordinator_url=coordinator))


def _follow(client: Any, job_id: str, *, as_json: bool) -> dict[str, Any]:
    """Wait for the job to finish, showing its rounds on stderr."""
    status = client.job_status(job_id)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), disable=as_json) as progress:
        bar = progress.add_task(f"job {job_id}", total=status["rounds"], info=status["status"])
        while status["status"] not in ("succeeded", "failed"):
            status = client.job_status(job_id, wait=5)
            # GBM history entries are trees (no loss); vertical entries may carry a null loss
            loss = status["history"][-1].get("train_loss") if status["history"] else None
            info = status["status"] + (f", loss {loss:.4f}" if loss is not None else "")
            progress.update(bar, completed=status["rounds_done"], info=info)
    return status


def _print_status(status: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    line = f"job {status['job_id']}: {status['status']}, rounds {status['rounds_done']}/{status['rounds']}"
    metrics = status.get("metrics") or {}
    for name in ("auc", "logloss", "rmse", "mae"):  # whichever the model's objective reports
        if isinstance(metrics.get(name), int | float):
            line += f", {name} {metrics[name]:.4f}"
    if status.get("error"):
        line += f"\nerror: {status['error'].get('message')}"
    typer.echo(line)


@job_app.command("submit")
def job_submit(
    job_file: Annotated[Path, typer.Argument(help="Job YAML: the JobSpec, participants, options.")],
    config: ConfigOption = Path("client.yaml"),
    coordinator: CoordinatorOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Submit a job (admin token); prints its id, or with --wait its final status."""
    data = _yaml(job_file)
    participants = data.pop("participants", None)
    options = data.pop("options", {}) or {}
    if not participants:
        raise ConfigError("the job file needs a participants list", field="participants")
    with _client(config, coordinator) as client:
        job_id = client.submit_job(data, participants, options)
        if not wait:
            typer.echo(json.dumps({"job_id": job_id}) if as_json else job_id)
            return
        status = _follow(client, job_id, as_json=as_json)
    _print_status(status, as_json=as_json)
    if status["status"] != "succeeded":
        raise typer.Exit(1)


@job_app.command("status")
def job_status(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    config: ConfigOption = Path("client.yaml"),
    coordinator: CoordinatorOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show a job's status, rounds and aggregate metrics (exit 1 if it failed)."""
    with _client(config, coordinator) as client:
        status = _follow(client, job_id, as_json=as_json) if wait else client.job_status(job_id)
    _print_status(status, as_json=as_json)
    if status["status"] == "failed":
        raise typer.Exit(1)
