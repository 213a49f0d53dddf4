"""Federation: typed messages, their binary codec and transports. Knows no algorithm or policy."""

from .codec import ALLOWED_DTYPES, Codec, decode, encode
from .messages import (
    MESSAGE_TYPES,
    EvaluateIns,
    EvaluateRes,
    Failure,
    FitIns,
    FitRes,
    Message,
    StatsIns,
    StatsRes,
    register,
)
from .transport import InProcessTransport, Transport

__all__ = [
    "ALLOWED_DTYPES",
    "Codec",
    "decode",
    "encode",
    "MESSAGE_TYPES",
    "Message",
    "register",
    "StatsIns",
    "StatsRes",
    "FitIns",
    "FitRes",
    "EvaluateIns",
    "EvaluateRes",
    "Failure",
    "Transport",
    "InProcessTransport",
]
