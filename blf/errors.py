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
    ├── ChainError                anything about the chain (NodeRegistry, BLIND staking)
    │   ├── ChainIdMismatchError  the RPC serves another chain than configured
    │   ├── InsufficientFundsError
    │   ├── ContractRevertError   a call reverted; carries the decoded reason
    │   ├── PendingTransactionError  an earlier, different tx of that kind may still land
    │   └── StakingError          a staking request refused before anything is sent
    │       ├── StakeAmountError  not a BLIND amount, too many decimals, <= 0, < MIN_STAKE
    │       └── UnbondingError    nothing to unstake or withdraw, or not unlocked yet
    ├── CryptoError               a blob, sealed key or commitment input is malformed
    │   └── TamperedError         AES-GCM authentication failed: wrong key or altered bytes
    ├── CofheError                anything about CoFHE (threshold decryption, encryption)
    │   ├── CofheTransportError   unreachable, timeout, 5xx, "busy": transient, retryable
    │   └── CofheRefusedError     a JSON-RPC error answer (no permit, no ACL grant): permanent
    ├── InferenceError            a model could not run
    │   └── UnknownModelError     no backend is configured for the model
    ├── IpfsError                 anything about IPFS
    │   ├── IpfsTransportError    every source unreachable or timing out: transient
    │   ├── CidMismatchError      bytes that do not hash to their CID: never used
    │   ├── UnverifiableCidError  a CID whose format blf cannot check against the bytes
    │   └── NoUploadTargetError   neither ipfs_api_url nor pinata_jwt is configured
    └── PaymentError              anything about the payment service (earnings)
        ├── PaymentTransportError unreachable, timeout, 5xx
        ├── PaymentStatusError    a 4xx answer
        └── PaymentProtocolError  a 2xx answer that does not match the REST shape

Errors marked transient are retried inside the job's deadline; the others fail the job
once, with the error's line as its recorded reason.

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
    "CidMismatchError",
    "CofheError",
    "CofheRefusedError",
    "CofheTransportError",
    "ConfigError",
    "ContractRevertError",
    "CryptoError",
    "IclError",
    "IclProtocolError",
    "IclStatusError",
    "IclTransportError",
    "InferenceError",
    "InsufficientFundsError",
    "IpfsError",
    "IpfsTransportError",
    "NoUploadTargetError",
    "NodeUnknownError",
    "PaymentError",
    "PaymentProtocolError",
    "PaymentStatusError",
    "PaymentTransportError",
    "PendingTransactionError",
    "StakeAmountError",
    "StakingError",
    "TamperedError",
    "UnbondingError",
    "UnknownModelError",
    "UnverifiableCidError",
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


class PendingTransactionError(ChainError):
    """A journalled transaction of the same kind, for other arguments, is not mined yet."""

    def __init__(self, message: str, *, tx_hash: str):
        super().__init__(message)
        self.tx_hash = tx_hash


class StakingError(ChainError):
    """A staking request refused by blf's own checks: nothing was sent."""


class StakeAmountError(StakingError):
    pass


class UnbondingError(StakingError):
    def __init__(self, message: str, *, seconds_left: int = 0):
        super().__init__(message)
        self.seconds_left = seconds_left


class CryptoError(BlfError):
    pass


class TamperedError(CryptoError):
    """AES-GCM refused the bytes: the key is wrong or the ciphertext was altered."""


class CofheError(BlfError):
    pass


class CofheTransportError(CofheError):
    """Connection failure, timeout, 5xx or a "busy" answer: worth retrying later."""


class CofheRefusedError(CofheError):
    """CoFHE answered with an error (bad permit, handle not granted): retrying won't help."""

    def __init__(self, message: str, *, code: int | None = None):
        super().__init__(message)
        self.code = code


class IpfsError(BlfError):
    pass


class IpfsTransportError(IpfsError):
    """No source answered in time: worth retrying later."""


class CidMismatchError(IpfsError):
    """Every source that answered served bytes that do not hash to the CID."""


class UnverifiableCidError(IpfsError):
    """A CID whose codec or hash blf cannot check (blf never uses unchecked bytes)."""


class NoUploadTargetError(IpfsError):
    """A leader must upload its output, and no upload target is configured."""


class InferenceError(BlfError):
    pass


class UnknownModelError(InferenceError):
    """No backend is configured for a model: its jobs fail rather than fall back."""


class PaymentError(BlfError):
    def __init__(self, message: str, *, url: str = ""):
        super().__init__(message)
        self.url = url


class PaymentTransportError(PaymentError):
    """Connection refused, timeout or a 5xx answer."""


class PaymentStatusError(PaymentError):
    def __init__(self, message: str, *, url: str, status: int):
        super().__init__(message, url=url)
        self.status = status


class PaymentProtocolError(PaymentError):
    """A 2xx answer whose body does not match the payment service's REST shape."""
