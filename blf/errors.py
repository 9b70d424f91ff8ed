"""The one exception tree of blf.

    BlfError                      anything blf raises on purpose; the CLI prints it as one line
    ├── ConfigError               config.json missing, unreadable, malformed, or a bad field
    ├── WalletError               keystore missing or unreadable
    │   └── WrongPasswordError    the keystore password does not decrypt it
    ├── AttestationError          a quote could not be produced or was refused
    ├── BrokerError               the Redis broker could not be started or reached
    ├── IclError                  anything about talking to the ICL
    │   ├── IclTransportError     connection failure, timeout, 5xx: transient, retryable
    │   ├── IclStatusError        a 4xx answer: our request was wrong, never retried
    │   │   └── NodeUnknownError  401/404 on assignments: the ICL forgot us, re-attest
    │   └── IclProtocolError      a 2xx answer that does not match the wire contract
    └── ChainError                anything about the NodeRegistry chain
        ├── ChainIdMismatchError  the RPC serves another chain than configured
        ├── InsufficientFundsError
        └── ContractRevertError   a call reverted; carries the decoded reason

Errors carry the facts needed to act on them (URL, status, field, address), and their
``str()`` is a single line fit to show an operator.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "BlfError",
    "BrokerError",
    "ChainError",
    "ChainIdMismatchError",
    "ConfigError",
    "ContractRevertError",
    "IclError",
    "IclProtocolError",
    "IclStatusError",
    "IclTransportError",
    "InsufficientFundsError",
    "NodeUnknownError",
    "WalletError",
    "WrongPasswordError",
]


class BlfError(Exception):
    """Base of every error blf raises on purpose."""


class ConfigError(BlfError):
    def __init__(self, message: str, *, path: str | None = None, field: str | None = None):
        super().__init__(message)
        self.path = path
        self.field = field


class WalletError(BlfError):
    pass


class WrongPasswordError(WalletError):
    pass


class AttestationError(BlfError):
    pass


class BrokerError(BlfError):
    pass


class IclError(BlfError):
    def __init__(self, message: str, *, method: str = "", url: str = ""):
        super().__init__(message)
        self.method = method
        self.url = url


class IclTransportError(IclError):
    """Connection refused, timeout or a 5xx answer: worth retrying later."""


class IclStatusError(IclError):
    def __init__(self, message: str, *, method: str, url: str, status: int, body: str = ""):
        super().__init__(message, method=method, url=url)
        self.status = status
        self.body = body


class NodeUnknownError(IclStatusError):
    """The ICL no longer knows this node (it restarted): re-attest, then resume."""


class IclProtocolError(IclError):
    """The ICL answered 2xx with a body that does not match the wire contract."""


class ChainError(BlfError):
    pass


class ChainIdMismatchError(ChainError):
    pass


class InsufficientFundsError(ChainError):
    def __init__(self, message: str, *, address: str):
        super().__init__(message)
        self.address = address


class ContractRevertError(ChainError):
    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason
