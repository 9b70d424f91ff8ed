// SPDX-License-Identifier: MIT
pragma solidity >=0.8.0 <0.9.0;

/// The one overload of Hardhat's console the CoFHE mocks call (MockCoFHE logs with it when
/// logging is switched on); anvil prints these calls as Hardhat does.
library console {
    address constant CONSOLE_ADDRESS = 0x000000000000000000636F6e736F6c652e6c6f67;

    function log(string memory p0) internal view {
        (bool ignored, ) = CONSOLE_ADDRESS.staticcall(abi.encodeWithSignature("log(string)", p0));
        ignored;
    }
}
