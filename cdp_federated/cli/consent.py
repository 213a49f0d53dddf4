"""`cdp-fl consent ...` commands."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from . import app

if TYPE_CHECKING:
    from ..consent.tcf import TCString

consent_app = typer.Typer(
    help="Inspect and import consent signals; decode IAB TCF strings.", no_args_is_help=True
)
app.add_typer(consent_app, name="consent")


# --- decode-tcf -----------------------------------------------------------------------------

_TCF_RESTRICTION_NAMES = {0: "not allowed", 1: "require consent", 2: "require legitimate interest"}


def _tcf_ids(ids: frozenset[int]) -> str:
    """``1-10, 23, 37`` for a readable summary; ``none`` when empty."""
    if not ids:
        return "none"
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _tcf_summary(tc: TCString) -> list[str]:
    data = tc.to_dict()
    yes = {True: "yes", False: "no"}
    lines = [
        f"TC string v{tc.version}, TCF policy version {tc.tcf_policy_version}, "
        f"vendor list version {tc.vendor_list_version}, "
        + ("service-specific" if tc.is_service_specific else "global"),
        f"created {data['created']}, last updated {data['last_updated']}",
        f"CMP {tc.cmp_id} version {tc.cmp_version}, consent screen {tc.consent_screen}, "
        f"language {tc.consent_language}, publisher country {tc.publisher_cc}",
        f"purpose one treatment: {yes[tc.purpose_one_treatment]}; "
        f"non-standard texts: {yes[tc.use_non_standard_texts]}",
        f"special features opted in: {_tcf_ids(tc.special_feature_optins)}",
        f"purposes with consent: {_tcf_ids(tc.purposes_consent)}",
        f"purposes with legitimate interest: {_tcf_ids(tc.purposes_li_transparency)}",
        f"vendors with consent ({len(tc.vendor_consents)}): {_tcf_ids(tc.vendor_consents)}",
        f"vendors with legitimate interest ({len(tc.vendor_legitimate_interests)}): "
        f"{_tcf_ids(tc.vendor_legitimate_interests)}",
    ]
    if tc.publisher_restrictions:
        lines.append("publisher restrictions:")
        lines += [
            f"  purpose {r.purpose}, {_TCF_RESTRICTION_NAMES[r.type]}: vendors {_tcf_ids(r.vendors)}"
            for r in tc.publisher_restrictions
        ]
    else:
        lines.append("publisher restrictions: none")
    lines.append(f"disclosed vendors: {_tcf_ids(tc.disclosed_vendors)}")
    lines.append(f"allowed vendors: {_tcf_ids(tc.allowed_vendors)}")
    pub = tc.publisher_tc
    if pub is None:
        lines.append("publisher TC: absent")
    else:
        lines.append(
            f"publisher TC: consent {_tcf_ids(pub.purposes_consent)}; legitimate interest "
            f"{_tcf_ids(pub.purposes_li_transparency)}; custom consent "
            f"{_tcf_ids(pub.custom_purposes_consent)}; custom legitimate interest "
            f"{_tcf_ids(pub.custom_purposes_li_transparency)}"
        )
    return lines


@consent_app.command("decode-tcf")
def decode_tcf(
    tc_string: Annotated[
        str, typer.Argument(help="IAB TCF v2 TC string (euconsent-v2 cookie or tcString).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the decoded fields as JSON on stdout.")
    ] = False,
) -> None:
    """Decode and validate an IAB TCF v2 TC string; invalid strings exit with code 2."""
    from ..consent.tcf import decode_tc_string

    tc = decode_tc_string(tc_string.strip())
    if as_json:
        typer.echo(json.dumps(tc.to_dict(), indent=2))
    else:
        typer.echo("\n".join(_tcf_summary(tc)))
