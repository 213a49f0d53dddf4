"""``cdp-fl align``: align two parties' customers by PSI or salted hash, both run locally."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, MissingColumnError, SourceUnavailableError
from ..results import make_result
from . import app
from .data import JsonOption, _emit

METHODS = ("psi", "salted-hash")


def _party(spec: str, option: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(
            "a party is NAME=PATH",
            field=option,
            value=spec,
            fix=f"e.g. {option} retailer=ids.parquet",
        )
    return name, Path(path)


def _read_column(path: Path, column: str):
    """One column of a CSV or Parquet file, as text (identifiers are never numbers)."""
    import polars as pl

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pl.scan_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt"):
            frame = pl.scan_csv(path, infer_schema=False)
        else:
            raise ConfigError(
                "unsupported file type", field="path", value=str(path), fix="use .csv or .parquet"
            )
        names = frame.collect_schema().names()
    except (OSError, pl.exceptions.ComputeError) as exc:
        raise SourceUnavailableError(
            f"cannot read {path}: {exc}", field="path", value=str(path), fix="check the file"
        ) from exc
    if column not in names:
        raise MissingColumnError(
            f"{path} has no column {column!r} (it has {names})",
            field="--key",
            value=column,
            fix="name the identifier column with --key",
        )
    return frame.select(pl.col(column).cast(pl.String)).collect().to_series()


def _each_on_its_own_thread(
    handlers: Mapping[str, Callable[[Any], Any]], pools: list[ThreadPoolExecutor]
) -> dict[str, Callable[[Any], Any]]:
    """Run every party's handler on a thread of its own (messages still cross the codec)."""
    out = {}
    for name, handler in handlers.items():
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"party-{name}")
        pools.append(pool)
        out[name] = lambda message, h=handler, p=pool: p.submit(h, message).result()
    return out


@app.command()
def align(
    left: Annotated[str, typer.Option("--left", help="NAME=PATH (CSV or Parquet): the receiver.")],
    right: Annotated[str, typer.Option("--right", help="NAME=PATH (CSV or Parquet).")],
    key: Annotated[str, typer.Option("--key", help="The identifier column in both files.")],
    method: Annotated[str, typer.Option(help="psi (across organisations) or salted-hash.")] = "psi",
    kind: Annotated[str, typer.Option(help="email, phone, device_id or customer_id.")] = "email",
    scheme: Annotated[str, typer.Option(help="Normalisation: uid2, google or meta.")] = "uid2",
    region: Annotated[
        str | None, typer.Option(help="Default phone region, e.g. US (phones without +country).")
    ] = None,
    reveal: Annotated[
        str, typer.Option(help="Who learns the matched rows: left or both.")
    ] = "left",
    cardinality: Annotated[
        bool, typer.Option("--cardinality", help="PSI: reveal only the intersection size.")
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(help="Policy YAML: the method must be allowed; its cohort minimum applies."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write each revealed party's matched row numbers to DIR/NAME.rows.parquet."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Align two parties' customers without revealing anyone outside the overlap. Both parties run
    here, each on its own thread; every message crosses the federation codec."""
    from ..identity.keyed_hash import derive_key, new_federation_secret
    from ..identity.normalize import normalize_ids
    from ..identity.psi import match_report, run_psi
    from ..identity.salted import run_salted_hash

    started = time.perf_counter()
    if method not in METHODS:
        raise ConfigError(
            "unknown method", field="--method", value=method, fix="psi or salted-hash"
        )
    if reveal not in ("left", "both"):
        raise ConfigError("unknown reveal", field="--reveal", value=reveal, fix="left or both")
    (left_name, left_path), (right_name, right_path) = (
        _party(left, "--left"),
        _party(right, "--right"),
    )
    if left_name == right_name:
        raise ConfigError("the parties need different names", field="--right", value=right_name)
    minimum = 1
    if policy is not None:
        minimum = _check_policy(policy, method, left_name, right_name)
    sides = {}
    for name, path in ((left_name, left_path), (right_name, right_path)):
        sides[name] = normalize_ids(
            _read_column(path, key), kind=kind, scheme=scheme, default_region=region
        )
    reveal_to = ("left",) if reveal == "left" else ("left", "right")
    pools: list[ThreadPoolExecutor] = []

    def factory(handlers, recorder):
        from ..federation.transport import InProcessTransport

        return InProcessTransport(_each_on_its_own_thread(handlers, pools), recorder=recorder)

    try:
        lv, rv = sides[left_name].values, sides[right_name].values
        if method == "psi":
            result = run_psi(
                lv,
                rv,
                mode="cardinality" if cardinality else "intersection",
                reveal_to=reveal_to,
                transport_factory=factory,
            )
        else:
            if cardinality:
                raise ConfigError(
                    "--cardinality needs PSI", field="--cardinality", fix="use --method psi"
                )
            job_key = derive_key(new_federation_secret(), f"align-{left_name}-{right_name}")
            result = run_salted_hash(
                lv, rv, job_key, reveal_to=reveal_to, transport_factory=factory
            )
    finally:
        for pool in pools:
            pool.shutdown()
    written = {}
    if out is not None:
        import polars as pl

        out.mkdir(parents=True, exist_ok=True)
        for name, rows in ((left_name, result.left_rows), (right_name, result.right_rows)):
            if rows is not None:
                target = out / f"{name}.rows.parquet"
                pl.DataFrame({"row": rows}).write_parquet(target)
                written[name] = str(target)
    summary = make_result(
        command="align",
        status="ok",
        method=method,
        intersection_size=match_report(result.intersection_size, minimum),
        left_size=len(lv),
        right_size=len(rv),
        invalid={n: s.invalid for n, s in sides.items()},
        seconds=round(time.perf_counter() - started, 3),
        bytes_exchanged=result.bytes_exchanged,
        alignment_files=written,
    )
    if as_json:
        _emit(summary, True)
    else:
        _print(summary, left_name, right_name)


def _check_policy(path: Path, method: str, left: str, right: str) -> int:
    from ..errors import PolicyViolation
    from ..governance.policy import load_policy

    policy = load_policy(path)
    wanted = "psi" if method == "psi" else "salted_hash"
    problems = []
    if wanted not in policy.identity.methods:
        problems.append(
            f"identity.methods: {wanted} is not allowed ({list(policy.identity.methods)})"
        )
    parties = [policy.partner(n) for n in (left, right)]
    missing = [n for n, p in zip((left, right), parties, strict=True) if p is None]
    if missing:
        problems.append(f"partners: {missing} are not listed partners")
    elif wanted == "salted_hash" and parties[0].organisation != parties[1].organisation:
        problems.append(
            "identity.methods: salted hashing across organisations lets the key holder "
            "dictionary-attack the other side's identifiers; use psi"
        )
    if problems:
        raise PolicyViolation(
            f"policy {policy.name!r} refuses the alignment: {'; '.join(problems)}",
            reasons=tuple(problems),
            field="--method",
            value=method,
            fix="use a method and partners the policy allows",
        )
    return policy.minimums.cohort_size


def _print(summary: dict, left: str, right: str) -> None:
    from rich.console import Console

    console = Console()
    console.print(
        f"{summary['method']}: {summary['intersection_size']} matched between {left} "
        f"({summary['left_size']:,} rows) and {right} ({summary['right_size']:,} rows) in "
        f"{summary['seconds']:.2f}s, {summary['bytes_exchanged']:,} bytes exchanged"
    )
    for name, n in summary["invalid"].items():
        if n:
            console.print(f"{name}: {n:,} invalid identifiers were not matched")
