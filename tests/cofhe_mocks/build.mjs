// Compiles Fhenix's CoFHE mock contracts (npm @fhenixprotocol/cofhe-mock-contracts, pinned in
// package.json) and the tests' KeyVault with solc-js; prints the artifacts as one JSON object.
// Usage: node build.mjs <node_modules directory>
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const modules = process.argv[2];
const require = createRequire(path.join(modules, 'noop.js'));
const solc = require('solc');
const here = path.dirname(new URL(import.meta.url).pathname);

const WANTED = ['KeyVault', 'ACL', 'TaskManager', 'MockZkVerifier', 'MockQueryDecrypter'];
const MOCKS = ['ACL.sol', 'MockTaskManager.sol', 'MockZkVerifier.sol', 'MockQueryDecrypter.sol'];

const sources = { 'KeyVault.sol': { content: fs.readFileSync(path.join(here, 'KeyVault.sol'), 'utf8') } };
for (const file of MOCKS) {
  const name = `@fhenixprotocol/cofhe-mock-contracts/${file}`;
  sources[name] = { content: fs.readFileSync(path.join(modules, name), 'utf8') };
}

// hardhat/console.sol comes from the shim beside this file (the mocks log through it);
// everything else from node_modules.
function findImports(name) {
  for (const base of [path.join(here, 'shim'), modules]) {
    const full = path.join(base, name);
    if (fs.existsSync(full)) return { contents: fs.readFileSync(full, 'utf8') };
  }
  return { error: `not found: ${name}` };
}

const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 1 },
    evmVersion: 'cancun',
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (output.errors ?? []).filter((e) => e.severity === 'error');
if (errors.length) {
  process.stderr.write(errors.map((e) => e.formattedMessage).join('\n'));
  process.exit(1);
}
const artifacts = { solc: solc.version() };
for (const [file, contracts] of Object.entries(output.contracts)) {
  if (file.startsWith('@openzeppelin')) continue;
  for (const [name, c] of Object.entries(contracts)) {
    if (!WANTED.includes(name)) continue;
    artifacts[name] = {
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
    };
  }
}
process.stdout.write(JSON.stringify(artifacts));
