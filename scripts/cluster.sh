#!/usr/bin/env bash
# A 3-node NATS JetStream cluster on loopback: three nats-server processes
# (2.9 or newer) with routes between them, each with its own store.
#
#   scripts/cluster.sh start    start n0..n2, wait until JetStream answers,
#                               print the seed list to give corral
#   scripts/cluster.sh stop     stop all three
#   scripts/cluster.sh kill N   SIGKILL node N (0..2), as a crash would
#   scripts/cluster.sh restart N  start node N again on its store
#   scripts/cluster.sh status   which nodes run, and the seed list
#
# Client ports 4301..4303 and route ports 6301..6303 by default
# (CLUSTER_CLIENT_BASE, CLUSTER_ROUTE_BASE); state in CLUSTER_DIR
# (default /tmp/corral-cluster). Use it with every stream on three replicas:
#
#   export NATS_URL=$(scripts/cluster.sh start)
#   export CORRAL_STREAMS__COMMANDS__REPLICAS=3 CORRAL_STREAMS__LIFECYCLE__REPLICAS=3 \
#          CORRAL_STREAMS__EVENTS__REPLICAS=3 CORRAL_STREAMS__DEAD_LETTERS__REPLICAS=3
#
# The nodes do not advertise client URLs (no_advertise): clients use the
# seed list they are given, as behind a load balancer or in Kubernetes.
set -euo pipefail

DIR=${CLUSTER_DIR:-/tmp/corral-cluster}
CLIENT_BASE=${CLUSTER_CLIENT_BASE:-4301}
ROUTE_BASE=${CLUSTER_ROUTE_BASE:-6301}
NODES=3

say() { echo "cluster: $*" >&2; }

seeds() {
  local urls=()
  for i in $(seq 0 $((NODES - 1))); do
    urls+=("nats://127.0.0.1:$((CLIENT_BASE + i))")
  done
  (IFS=,; echo "${urls[*]}")
}

pid_of() { cat "$DIR/n$1/pid" 2>/dev/null || true; }

running() {
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

configure() {
  local i=$1 routes=() j
  for j in $(seq 0 $((NODES - 1))); do
    [ "$j" = "$i" ] || routes+=("\"nats-route://127.0.0.1:$((ROUTE_BASE + j))\"")
  done
  mkdir -p "$DIR/n$i/store"
  cat >"$DIR/n$i/server.conf" <<EOF
server_name: "n$i"
listen: "127.0.0.1:$((CLIENT_BASE + i))"
jetstream { store_dir: "$DIR/n$i/store" }
log_file: "$DIR/n$i/nats.log"
cluster {
  name: "corral"
  listen: "127.0.0.1:$((ROUTE_BASE + i))"
  no_advertise: true
  routes: [$(IFS=,; echo "${routes[*]}")]
}
EOF
}

start_node() {
  local i=$1
  if running "$i"; then
    say "n$i already runs (pid $(pid_of "$i"))"
    return
  fi
  [ -f "$DIR/n$i/server.conf" ] || configure "$i"
  nats-server -c "$DIR/n$i/server.conf" >/dev/null 2>&1 &
  echo $! >"$DIR/n$i/pid"
}

wait_listening() {
  local i=$1 port=$((CLIENT_BASE + $1)) tries=0
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -gt 200 ] || ! running "$i"; then
      say "n$i did not listen on $port; its log: $DIR/n$i/nats.log"
      tail -n 20 "$DIR/n$i/nats.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
}

wait_jetstream() {
  # A clustered JetStream is ready once a meta leader is elected.
  local tries=0
  until grep -q "JetStream cluster new metadata leader\|Self is new JetStream cluster metadata leader" "$DIR"/n*/nats.log 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then
      say "no JetStream metadata leader within 30 s; logs in $DIR/n*/nats.log"
      exit 1
    fi
    sleep 0.1
  done
}

node_arg() {
  case "${1:-}" in
    0 | 1 | 2) echo "$1" ;;
    *) say "name a node: 0, 1 or 2"; exit 2 ;;
  esac
}

command -v nats-server >/dev/null || {
  say "nats-server is not installed (Debian: apt-get install nats-server)"
  exit 1
}

case "${1:-}" in
  start)
    mkdir -p "$DIR"
    for i in $(seq 0 $((NODES - 1))); do start_node "$i"; done
    for i in $(seq 0 $((NODES - 1))); do wait_listening "$i"; done
    wait_jetstream
    say "3 nodes up in $DIR"
    seeds
    ;;
  stop)
    for i in $(seq 0 $((NODES - 1))); do
      if running "$i"; then kill "$(pid_of "$i")"; fi
      rm -f "$DIR/n$i/pid"
    done
    say "stopped"
    ;;
  kill)
    i=$(node_arg "${2:-}")
    if running "$i"; then kill -9 "$(pid_of "$i")"; fi
    rm -f "$DIR/n$i/pid"
    say "n$i killed"
    ;;
  restart)
    i=$(node_arg "${2:-}")
    start_node "$i"
    wait_listening "$i"
    say "n$i up"
    ;;
  status)
    for i in $(seq 0 $((NODES - 1))); do
      if running "$i"; then say "n$i runs (pid $(pid_of "$i"))"; else say "n$i down"; fi
    done
    seeds
    ;;
  *)
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
