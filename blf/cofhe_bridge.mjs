// blf's CoFHE helper: Fhenix's @cofhe/sdk behind line-delimited JSON on stdin/stdout.
//
// It holds no key. Whatever the SDK needs signed (a permit's EIP-712 typed data) it asks
// the Python process for, over the same pipe; Python decides whether to sign. The node
// directory, the RPC URL and the address come in the "connect" request, never in argv or
// the environment. Diagnostics go to stderr, which Python logs; stdout carries only the
// protocol, one JSON object per line:
//
//   helper -> python  {"event": "ready", "sdk": "0.5.1", "node": "v20.x"}
//   python -> helper  {"id": 1, "method": "connect", "params": {...}}
//   helper -> python  {"id": 1, "result": {...}}  or  {"id": 1, "error": {...}}
//   helper -> python  {"sign": 7, "kind": "typedData", "data": {...}}
//   python -> helper  {"sign": 7, "result": "0x..."}  or  {"sign": 7, "error": "..."}

import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';

const modules = process.argv[2];
if (!modules) {
  process.stderr.write('usage: node cofhe_bridge.mjs <node_modules directory>\n');
  process.exit(2);
}

const load = (spec) => import(pathToFileURL(join(modules, spec)).href);

const write = (message) =>
  process.stdout.write(
    JSON.stringify(message, (_, value) => (typeof value === 'bigint' ? value.toString() : value)) + '\n'
  );

// --- signing through Python ----------------------------------------------------------------

let nextSign = 1;
const signWaiters = new Map();

function askPython(kind, data) {
  const sign = nextSign++;
  return new Promise((resolve, reject) => {
    signWaiters.set(sign, { resolve, reject });
    write({ sign, kind, data });
  });
}

function answerSign(message) {
  const waiter = signWaiters.get(message.sign);
  if (!waiter) return;
  signWaiters.delete(message.sign);
  if (typeof message.result === 'string') waiter.resolve(message.result);
  else waiter.reject(new Error(`the node refused to sign: ${message.error ?? 'no reason given'}`));
}

// --- the SDK ---------------------------------------------------------------------------------

const sdkPackage = JSON.parse(readFileSync(join(modules, '@cofhe/sdk/package.json'), 'utf8'));
const [sdkNode, sdkChains, sdkCore, viem, viemAccounts, viemChains] = await Promise.all([
  load('@cofhe/sdk/dist/node.js'),
  load('@cofhe/sdk/dist/chains.js'),
  load('@cofhe/sdk/dist/core.js'),
  load('viem/_esm/index.js'),
  load('viem/_esm/accounts/index.js'),
  load('viem/_esm/chains/index.js'),
]);

let client = null;
let session = null;

function pythonAccount(address) {
  return viemAccounts.toAccount({
    address,
    async signMessage() {
      throw new Error('blf signs no plain messages for the CoFHE SDK');
    },
    async signTransaction() {
      throw new Error('blf sends no transactions from the CoFHE helper');
    },
    async signTypedData(typedData) {
      return askPython('typedData', typedData);
    },
  });
}

function chainFor(chainId, rpcUrl) {
  return viem.defineChain({
    id: chainId,
    name: `chain ${chainId}`,
    nativeCurrency: { name: 'Ether', symbol: 'ETH', decimals: 18 },
    rpcUrls: { default: { http: [rpcUrl] } },
  });
}

async function connect({ rpcUrl, chainId, address, timeoutMs, mockSignerKey }) {
  const cofheChain = sdkChains.getChainById(chainId);
  if (!cofheChain) {
    const known = Object.values(sdkChains.chains).map((c) => `${c.id} (${c.name})`);
    throw Object.assign(new Error(`chain id ${chainId} is not one the SDK knows: ${known.join(', ')}`), {
      code: 'UNSUPPORTED_CHAIN',
    });
  }
  const chain = chainFor(chainId, rpcUrl);
  const transport = viem.http(rpcUrl, { timeout: timeoutMs, retryCount: 0 });
  const publicClient = viem.createPublicClient({ chain, transport });
  const walletClient = viem.createWalletClient({ chain, transport, account: pythonAccount(address) });
  const onChain = await publicClient.getChainId();
  if (onChain !== chainId) {
    throw Object.assign(new Error(`the RPC serves chain id ${onChain}, not the configured ${chainId}`), {
      code: 'WRONG_CHAIN',
    });
  }
  const internal = {};
  if (cofheChain.environment === 'MOCK' && mockSignerKey) {
    // On a local chain the SDK's mocks record ciphertexts through their own public test
    // signer; point it at this RPC instead of the SDK's default of 127.0.0.1:8545.
    const signer = viemAccounts.privateKeyToAccount(mockSignerKey);
    internal.zkvWalletClient = viem.createWalletClient({ chain: viemChains.hardhat, transport, account: signer });
  }
  const config = sdkNode.createCofheConfig({
    supportedChains: [cofheChain],
    mocks: { decryptDelay: 0, encryptDelay: 0 },
    _internal: internal,
  });
  client = sdkNode.createCofheClient(config);
  await client.connect(publicClient, walletClient);
  session = { address, chainId, environment: cofheChain.environment };
  return { chainId, environment: cofheChain.environment, sdk: sdkPackage.version };
}

function requireClient() {
  if (!client) throw Object.assign(new Error('not connected'), { code: 'NOT_CONNECTED' });
  return client;
}

async function permit() {
  return requireClient().permits.getOrCreateSelfPermit(session.chainId, session.address);
}

async function decrypt({ ctHash }) {
  const cofhe = requireClient();
  const held = await permit();
  const value = await cofhe.decryptForView(BigInt(ctHash), sdkCore.FheTypes.Uint128).withPermit(held).execute();
  return { value: BigInt(value).toString() };
}

async function encrypt({ values }) {
  const cofhe = requireClient();
  const items = values.map((value) => sdkCore.Encryptable.uint128(BigInt(value)));
  const inputs = await cofhe.encryptInputs(items).execute();
  return {
    inputs: inputs.map((input) => ({
      ctHash: BigInt(input.ctHash).toString(),
      securityZone: input.securityZone,
      utype: input.utype,
      signature: input.signature,
    })),
  };
}

const methods = {
  connect,
  decrypt,
  encrypt,
  ping: async () => ({ sdk: sdkPackage.version, connected: client !== null }),
};

// --- errors ------------------------------------------------------------------------------------

// Codes the SDK raises when the network said no: retrying the same request cannot help.
const REFUSED = new Set([
  'PERMIT_NOT_FOUND',
  'INVALID_PERMIT_DATA',
  'INVALID_UTYPE',
  'UNSUPPORTED_CHAIN',
  'WRONG_CHAIN',
  'NOT_CONNECTED',
]);

function describe(error) {
  const code = typeof error?.code === 'string' ? error.code : 'ERROR';
  const text = String(error?.shortMessage ?? error?.message ?? error);
  const refused = REFUSED.has(code) || /NotAllowed|Access Denied|PermissionInvalid/i.test(text);
  return { code, message: text.split('\n')[0].slice(0, 300), refused };
}

// --- the loop ------------------------------------------------------------------------------------

async function handle(message) {
  const method = methods[message.method];
  if (!method) {
    write({ id: message.id, error: { code: 'UNKNOWN_METHOD', message: `no method ${message.method}`, refused: true } });
    return;
  }
  try {
    write({ id: message.id, result: await method(message.params ?? {}) });
  } catch (error) {
    write({ id: message.id, error: describe(error) });
  }
}

const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  let message;
  try {
    message = JSON.parse(line);
  } catch {
    process.stderr.write('ignored a line that is not JSON\n');
    return;
  }
  if (message.sign !== undefined) answerSign(message);
  else void handle(message);
});
// Python closing our stdin is the signal to stop.
lines.on('close', () => process.exit(0));

write({ event: 'ready', sdk: sdkPackage.version, node: process.version });
