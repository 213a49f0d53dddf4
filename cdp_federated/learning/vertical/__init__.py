"""Vertical federated learning: SecureBoost-style GBM with homomorphically encrypted gradients.

Parties hold the same (PSI-aligned) rows and different features; the active party holds the
labels and the HE secret key. See ``docs/vertical.md`` for the protocol and what each party learns.
"""

from .active import ActiveParty
from .channel import InProcessChannel, PartyChannel
from .logreg import (
    LogRegParams,
    VerticalLogRegActive,
    VerticalLogRegPassive,
    fit_vertical_logreg,
)
from .messages import VERTICAL_CODEC, VERTICAL_MESSAGE_TYPES
from .model import ActiveModel
from .params import SecureBoostParams
from .passive import PassiveParty

__all__ = [
    "ActiveParty",
    "PassiveParty",
    "ActiveModel",
    "SecureBoostParams",
    "InProcessChannel",
    "PartyChannel",
    "VERTICAL_CODEC",
    "VERTICAL_MESSAGE_TYPES",
    "LogRegParams",
    "VerticalLogRegActive",
    "VerticalLogRegPassive",
    "fit_vertical_logreg",
]
