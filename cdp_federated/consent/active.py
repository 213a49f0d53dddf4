"""The consent rule a participant's store applies when no job names one (e.g. scoring).

A participant that runs under a policy records it in its store (``cdp-fl policy activate``, or
the demo), so every use of its data, training or scoring, answers consent with the same rule.
Without one, the built-in rules of :mod:`.purposes` apply.
"""

from __future__ import annotations

import functools

import yaml

from ..errors import ConfigError, PolicyViolation
from ..store import Store
from .purposes import ConsentRuleLike, purpose_rule

__all__ = ["ACTIVE_POLICY_META", "activate_policy", "active_rule"]

ACTIVE_POLICY_META = "active_policy"


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def activate_policy(store: Store, policy) -> None:
    """Record ``policy`` (a loaded :class:`~cdp_federated.governance.policy.Policy`) as the
    store's consent policy: its normalised document (optional sections left out rather than
    null, so it loads back), checked to reload with the same content hash."""
    # YAML, not JSON: PyYAML (YAML 1.1) reads JSON's 1e-06 as text, and writes 1.0e-06.
    document = yaml.safe_dump(_without_nulls(policy.to_dict()), sort_keys=True)
    if _policy(document).content_hash != policy.content_hash:
        raise ConfigError(
            "policy does not reload with the same content hash",
            field="policy",
            value=policy.name,
            fix="report this: the policy's normal form is not stable",
        )
    store.set_meta(ACTIVE_POLICY_META, document)


@functools.lru_cache(maxsize=16)
def _policy(document: str):
    from ..governance.policy import load_policy

    return load_policy(document)


def active_rule(store: Store, purpose: str) -> ConsentRuleLike | None:
    """The store's policy rule for ``purpose``; the built-in rule without a policy; ``None`` when
    the active policy does not permit ``purpose`` at all (so nothing is allowed)."""
    document = store.get_meta(ACTIVE_POLICY_META)
    if document is None:
        return purpose_rule(purpose)
    try:
        return _policy(document).purpose_rule(purpose)
    except PolicyViolation:
        return None
