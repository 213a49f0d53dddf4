"""cdp-federated: train models across organisations and regions without moving customer data."""

from .errors import CDPFederatedError
from .hookspecs import hookimpl
from .jobs import JobSpec

__version__ = "0.1.0"

__all__ = ["CDPFederatedError", "JobSpec", "hookimpl", "__version__"]
