// Makes a js-ipfs repository config offline and loopback-only, on the given ports:
//   node configure.mjs REPO_DIR API_PORT GATEWAY_PORT RPC_PORT
import { readFileSync, writeFileSync } from 'node:fs'

const [repo, apiPort, gatewayPort, rpcPort] = process.argv.slice(2)
if (!rpcPort) {
  console.error('usage: node configure.mjs REPO_DIR API_PORT GATEWAY_PORT RPC_PORT')
  process.exit(2)
}
const path = `${repo}/config`
const config = JSON.parse(readFileSync(path, 'utf8'))
Object.assign(config.Addresses, {
  Swarm: [], // no libp2p listeners: nothing to dial in, nothing announced
  API: `/ip4/127.0.0.1/tcp/${apiPort}`,
  Gateway: `/ip4/127.0.0.1/tcp/${gatewayPort}`,
  RPC: `/ip4/127.0.0.1/tcp/${rpcPort}`,
  Delegates: []
})
config.Bootstrap = []
config.Discovery = { MDNS: { Enabled: false }, webRTCStar: { Enabled: false } }
writeFileSync(path, JSON.stringify(config, null, 2))
