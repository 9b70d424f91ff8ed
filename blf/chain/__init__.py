"""The node's contracts: NodeRegistry (registration, heartbeat) and BLIND staking.

`tx` holds what every client shares (chain id check, fees, nonces, receipts), `pending`
the journal of signed transactions not yet mined, and `registry` and `staking` one contract
client each. The names below are the package's public surface, kept from when it was one
module.
"""

from blf.chain.registry import (
    NODE_REGISTRY_ABI,
    ChainClient,
    ChainNodeStatus,
    HeartbeatOutcome,
    NodeRecord,
)
from blf.chain.staking import (
    StakeInfo,
    StakeOutcome,
    StakingClient,
    StakingStatus,
    format_amount,
    parse_amount,
)
from blf.chain.tx import FeeQuote, TxResult, _send_error_kind

__all__ = [
    "NODE_REGISTRY_ABI",
    "ChainClient",
    "ChainNodeStatus",
    "FeeQuote",
    "HeartbeatOutcome",
    "NodeRecord",
    "StakeInfo",
    "StakeOutcome",
    "StakingClient",
    "StakingStatus",
    "TxResult",
    "_send_error_kind",
    "format_amount",
    "parse_amount",
]
