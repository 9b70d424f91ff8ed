// SPDX-License-Identifier: MIT
pragma solidity ^0.8.25;

import "@fhenixprotocol/cofhe-contracts/FHE.sol";

/// The tests' stand-in for the network's PromptKeyStore: whoever stores a pair of encrypted
/// uint128 halves (a job's prompt key, or a leader's output key) names the one reader, who
/// may then decrypt both through CoFHE.
contract KeyVault {
    event Stored(uint256 high, uint256 low, address reader);

    function store(InEuint128 memory high, InEuint128 memory low, address reader) public {
        euint128 h = FHE.asEuint128(high);
        euint128 l = FHE.asEuint128(low);
        FHE.allowThis(h);
        FHE.allowThis(l);
        FHE.allow(h, reader);
        FHE.allow(l, reader);
        emit Stored(euint128.unwrap(h), euint128.unwrap(l), reader);
    }
}
