"""`cdp-fl policy ...` commands."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError, PolicySchemaError
from ..jobs import JobSpec
from . import app
from .data import DbOption, JsonOption, _url

policy_app = typer.Typer(
    help="Check governance policies and jobs against them.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")

EXIT_DENIED = 1
EXIT_INVALID = 2


def _exit(code: int) -> None:
    raise typer.Exit(code)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


_SUBMISSION_KEYS = ("participants", "options")


def load_job_file(path: Path, participant: str | None) -> tuple[JobSpec, Any]:
    """A job file: the JobSpec fields plus a ``context:`` mapping of DecisionContext fields.
    ``participant`` (``--participant``) overrides ``context.participant``. The submission keys of
    ``cdp-fl job submit`` (``participants``, ``options``) are accepted and ignored, so the file
    that will be submitted can be checked as it is. A vertical job is decided with identity
    method ``psi`` (``params.align``), as each party decides it."""
    from ..governance.engine import DecisionContext

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read job file: {exc}", field="--job", value=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"job file is not valid YAML: {exc}", field="--job", value=str(path)
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError("job file must be a mapping", field="--job", value=str(path))
    job_keys = {f.name for f in fields(JobSpec)}
    unknown = sorted(set(data) - job_keys - {"context", *_SUBMISSION_KEYS})
    if unknown:
        raise ConfigError(
            f"unknown job key(s): {', '.join(unknown)}",
            field="--job",
            value=unknown[0],
            fix=f"use the JobSpec fields ({', '.join(sorted(job_keys))}) and context",
        )
    if "participants" in data:  # a submission file: the coordinator assigns the id
        data.setdefault("job_id", f"{path.stem}-check")
    required = {
        f.name for f in fields(JobSpec) if f.default is MISSING and f.default_factory is MISSING
    }
    missing = sorted(k for k in required if k not in data)
    if missing:
        raise ConfigError(f"job file lacks {', '.join(missing)}", field="--job", value=str(path))
    spec = {k: v for k, v in data.items() if k not in ("context", *_SUBMISSION_KEYS)}
    spec["features"] = tuple(spec.get("features") or ())
    spec["params"] = dict(spec.get("params") or {})
    job = JobSpec(**spec)
    context = dict(data.get("context") or {})
    if participant:
        context["participant"] = participant
    if not context.get("participant"):
        raise ConfigError(
            "no participant to decide for",
            field="--participant",
            fix="pass --participant NAME or set context.participant in the job file",
        )
    context.setdefault("now", datetime.now(UTC))
    if job.kind == "vertical":
        context.setdefault("identity_method", job.params.get("align", "psi"))
    return job, DecisionContext.from_dict(context)


def _print_errors(err: PolicySchemaError, path: Path, as_json: bool) -> None:
    if as_json:
        _echo_json(
            {
                "error": type(err).__name__,
                "policy_file": str(path),
                "errors": [
                    {"line": line, "path": where, "message": msg} for line, where, msg in err.errors
                ],
            }
        )
        return
    console = Console(stderr=True, soft_wrap=True, highlight=False)
    count = len(err.errors)
    console.print(f"{path}: {count} error{'s' if count != 1 else ''}", markup=False)
    for line, where, msg in err.errors:
        loc = f"{path}:{line}" if line else str(path)
        console.print(f"  {loc}: {where + ': ' if where else ''}{msg}", markup=False)


def _summary(policy: Any) -> None:
    console = Console(highlight=False)
    dp = policy.privacy.dp
    out = Table(show_header=False, title=f"policy {policy.name} v{policy.version}")
    out.add_column("field", style="bold")
    out.add_column("value")
    rows = [
        ("content hash", policy.content_hash),
        ("description", policy.description),
        ("purposes", f"{', '.join(policy.purposes.allowed)} ({policy.purposes.lawful_basis})"),
        (
            "consent",
            f"opt-in {', '.join(policy.consent.opt_in) or '-'}; opt-out "
            f"{', '.join(policy.consent.opt_out) or '-'}; unknown jurisdiction "
            f"{policy.consent.unknown_jurisdiction}",
        ),
        *[
            (f"  {p.purpose}", ", ".join(p.signals + p.opt_out_signals) or "-")
            for p in policy.consent.purposes
        ],
        *[
            (f"partner {p.name}", f"{p.organisation}, {p.region}, {', '.join(p.roles)}")
            for p in policy.partners
        ],
        ("features allowed", ", ".join(policy.features.allowed)),
        ("features forbidden", (", ".join(policy.features.forbidden) or "-") + " + built-in PII"),
        (
            "residency",
            f"data {', '.join(policy.residency.data_regions)}; coordinator "
            f"{', '.join(policy.residency.coordinator_regions)}",
        ),
        (
            "minimums",
            f"{policy.minimums.rows_per_party} rows per party; cohorts of "
            f"{policy.minimums.cohort_size}",
        ),
        ("identity", ", ".join(policy.identity.methods) or "-"),
        ("secure aggregation", policy.privacy.secure_aggregation),
        (
            "differential privacy",
            "not required"
            if dp is None
            else f"epsilon <= {dp.epsilon_per_run} per run, delta <= {dp.delta:g}"
            + (
                f"; budget {dp.budget.epsilon} per {dp.budget.window_days} days"
                if dp.budget
                else ""
            ),
        ),
        (
            "outputs",
            f"{', '.join(policy.outputs.uses)}; kept {policy.outputs.retention_days} days",
        ),
    ]
    for name, value in rows:
        out.add_row(name, value)
    console.print(out, markup=False)


def _decision_table(decision: Any) -> None:
    console = Console(highlight=False)
    verdict = "ALLOWED" if decision.allow else "DENIED"
    out = Table(
        "rule",
        "ok",
        "reason",
        title=f"{verdict}: job {decision.job_id} for {decision.participant} under policy "
        f"{decision.policy_name} v{decision.policy_version} ({decision.policy_hash[:12]})",
    )
    for r in decision.reasons:
        out.add_row(r.rule, "ok" if r.ok else "DENY", r.message)
    console.print(out, markup=False)
    console.print(verdict, markup=False)


@policy_app.command("check")
def check(
    policy_file: Annotated[Path, typer.Argument(help="The YAML policy to validate.")],
    job: Annotated[
        Path | None,
        typer.Option(
            "--job", help="A job YAML (JobSpec fields plus a context: mapping) to decide."
        ),
    ] = None,
    participant: Annotated[
        str | None,
        typer.Option("--participant", help="Decide for this participant (default: the job's)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a policy (errors with line numbers, exit 2); with --job, decide the job: exit 0
    when allowed, 1 when denied, every rule listed."""
    from ..governance.engine import evaluate
    from ..governance.policy import load_policy

    try:
        policy = load_policy(policy_file)
    except PolicySchemaError as err:
        _print_errors(err, policy_file, as_json)
        _exit(EXIT_INVALID)
        return
    if job is None:
        if as_json:
            _echo_json(
                {
                    "policy": policy.name,
                    "version": policy.version,
                    "policy_hash": policy.content_hash,
                    "valid": True,
                    "document": policy.to_dict(),
                }
            )
        else:
            _summary(policy)
        return
    spec, context = load_job_file(job, participant)
    decision = evaluate(policy, spec, context)
    if as_json:
        _echo_json(decision.to_dict())
    else:
        _decision_table(decision)
    if not decision.allow:
        _exit(EXIT_DENIED)


@policy_app.command("activate")
def activate(
    policy_file: Annotated[Path, typer.Argument(help="The YAML policy this store runs under.")],
    db: DbOption = None,
) -> None:
    """Record the policy in a participant's store, so every use of its data (training, scoring,
    consent status) answers consent with the same rules; prints its content hash."""
    from ..consent.active import activate_policy
    from ..governance.policy import load_policy
    from ..store import open_store

    policy = load_policy(policy_file)
    store = open_store(_url(db), create=True)
    activate_policy(store, policy)
    store.dispose()
    typer.echo(f"{policy.name} v{policy.version} ({policy.content_hash}) active")
