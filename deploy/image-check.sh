#!/usr/bin/env bash
# The container image without a container daemon (CI machines have none): the binary built by
# the Dockerfile's own build command, started with the image's own environment, configuration
# and entrypoint arguments under a scratch root standing in for the volume, and probed with the
# image's HEALTHCHECK command — unhealthy without an upstream account, healthy with one.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(sed -n 's/^RUN \(cargo build [^\\]*\).*/\1/p' Dockerfile | sed 's/ *$//')
[ -n "$build" ] || { echo "no cargo build line in the Dockerfile"; exit 1; }
echo "building as the image does: $build"
$build
bin=target/release/turnpike
work=$(mktemp -d)
pids=""
trap 'kill $pids 2>/dev/null || true; rm -rf "$work"' EXIT
# The image's ENV, with its paths moved under the scratch root.
env_args=()
while read -r kv; do
  kv=${kv//\/var\/lib\/turnpike/$work\/var}
  kv=${kv//\/etc\/turnpike\/turnpike.toml/$PWD\/config\/turnpike.toml}
  env_args+=("$kv")
done < <(awk '/^ENV /{on=1; sub(/^ENV /,"")} on{line=$0; sub(/ *\\$/,"",line); gsub(/^ +/,"",line); print line; if ($0 !~ /\\$/) on=0}' Dockerfile)
mkdir -p "$work/var"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
health=$(sed -n 's/^ *CMD \["\/usr\/local\/bin\/turnpike", "\([a-z]*\)"\]/\1/p' Dockerfile)
[ "$health" = healthcheck ] || { echo "HEALTHCHECK does not run turnpike healthcheck"; exit 1; }
run() { env "${env_args[@]}" TURNPIKE_SERVER__BIND="0.0.0.0:$port" "$@"; }
# In the background, as the process itself (its pid is what the trap kills), logging to $1.
spawn() {
  local log=$1
  shift
  (exec env "${env_args[@]}" TURNPIKE_SERVER__BIND="0.0.0.0:$port" "$@" 2>"$log" >/dev/null) &
  pids="$pids $!"
}

# Without an upstream account: running, not healthy, and it says why.
spawn "$work/relay.log" "$bin" serve
for _ in $(seq 1 100); do grep -q 'listening on' "$work/relay.log" && break; sleep 0.1; done
if out=$(run "$bin" healthcheck 2>&1); then echo "healthy without an account: $out"; exit 1; fi
echo "$out" | grep -q "not ready" || { echo "unexpected: $out"; exit 1; }
kill -TERM $pids
wait $pids || true
pids=""

# With one (the sim): healthy; the spool and the database are where the volume goes.
"$bin" sim --bind 127.0.0.1:0 2>"$work/sim.log" >/dev/null &
pids="$!"
for _ in $(seq 1 100); do grep -q 'listening on' "$work/sim.log" && break; sleep 0.1; done
sim=$(grep -o 'listening on http://[0-9.:]*' "$work/sim.log" | head -1 | sed 's|.*http://||')
# An operator mounts a configuration of their own over the image's.
cp config/turnpike.toml "$work/turnpike.toml"
printf '\n[[accounts]]\nname = "sim"\nbase_url = "http://%s/v1"\napi_key = "sk-sim"\n' "$sim" >>"$work/turnpike.toml"
spawn "$work/relay2.log" env TURNPIKE_CONFIG="$work/turnpike.toml" "$bin" serve
for _ in $(seq 1 50); do run "$bin" healthcheck >/dev/null 2>&1 && break; sleep 0.2; done
run "$bin" healthcheck || { tail -5 "$work/relay2.log"; exit 1; }
[ -d "$work/var/spool" ] && [ -f "$work/var/turnpike.db" ] || { echo "spool or database not on the volume"; ls -R "$work/var"; exit 1; }
grep -q '"level":"INFO"' "$work/relay2.log" || { echo "the image's log format is not JSON"; head -3 "$work/relay2.log"; exit 1; }
echo "image: binary built as the Dockerfile builds it; unhealthy without an account, healthy with one; data on the volume"
