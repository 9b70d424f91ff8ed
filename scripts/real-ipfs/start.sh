#!/usr/bin/env bash
# Starts an offline js-ipfs daemon (RPC API + read-only gateway) on loopback ports, in the
# foreground; prints "Daemon is ready" once both listen.
#   start.sh INSTALL_DIR REPO_DIR API_PORT GATEWAY_PORT RPC_PORT
# INSTALL_DIR holds node_modules from `npm install` of this directory's package.json;
# REPO_DIR is created (init) on first use and reused after.
set -euo pipefail
if [ $# -ne 5 ]; then
    echo "usage: $0 INSTALL_DIR REPO_DIR API_PORT GATEWAY_PORT RPC_PORT" >&2
    exit 2
fi
install_dir=$1 repo=$2 api_port=$3 gateway_port=$4 rpc_port=$5
here=$(cd "$(dirname "$0")" && pwd)
cli="$install_dir/node_modules/ipfs/src/cli.js"
if [ ! -f "$cli" ]; then
    echo "$cli not found: run npm install in $install_dir with $here/package.json" >&2
    exit 2
fi
export IPFS_PATH=$repo
if [ ! -f "$repo/config" ]; then
    node --import "$here/polyfill.mjs" "$cli" init --empty-repo >/dev/null
fi
node "$here/configure.mjs" "$repo" "$api_port" "$gateway_port" "$rpc_port"
exec node --import "$here/polyfill.mjs" "$cli" daemon --offline
