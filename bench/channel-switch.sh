#!/usr/bin/env bash
# Time from `upkeepctl member set-channel` to the node OS channel in force on every node of the member
# (issue 4). Real release binaries: one hub (SQLite), N real upkeep-agent processes on their own root trees,
# mTLS with a fresh CA. For each switch the clock starts just before upkeepctl is run; a node's channel is in
# force when its agent has written the channel's files and reported it; the clock stops when `node list` first
# shows every node in force (an upper bound: one poll is one upkeepctl call). Prints the median and worst switch
# and writes
# bench/results/channel-switch.json. Usage: bench/channel-switch.sh [--nodes N] [--switches S]
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=20
SWITCHES=8
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --switches) SWITCHES="$2"; shift 2 ;;
    *) echo "channel-switch: unknown argument $1 (use --nodes N, --switches S)" >&2; exit 2 ;;
  esac
done
cargo build --quiet --release --bins -p upkeep-hub -p upkeep-agent
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release"
WORK="$(mktemp -d /tmp/upkeep-chbench.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export UPKEEP_HUB="https://127.0.0.1:$PORT" UPKEEP_CA="$WORK/pki/ca.pem" UPKEEP_CERT="$WORK/pki/operator.pem" UPKEEP_KEY="$WORK/pki/operator.key"
"$BIN/upkeepctl" pki init --dir "$WORK/pki" >/dev/null
cat > "$WORK/hub.toml" <<TOML
listen = "127.0.0.1:$PORT"
state_dir = "$WORK/hub"
[tls]
ca = "$WORK/pki/ca.pem"
cert = "$WORK/pki/hub.pem"
key = "$WORK/pki/hub.key"
TOML
"$BIN/upkeep-hub" --config "$WORK/hub.toml" 2>"$WORK/hub.log" &
PIDS+=($!)
for i in $(seq 1 "$NODES"); do
  name=$(printf "node-%03d" "$i"); root="$WORK/nodes/$name/root"
  mkdir -p "$root/etc/upkeep"
  printf 'ID=debian\nVERSION_ID="12"\n' > "$root/etc/os-release"
  printf 'FAMILY=Debian-12\nVERSION=202311.07.0\n' > "$root/etc/upkeep/node-image"
  "$BIN/upkeepctl" pki issue-node --dir "$WORK/pki" --name "$name" >/dev/null
  cat > "$WORK/nodes/$name/agent.toml" <<TOML
hub = "https://127.0.0.1:$PORT"
member = "bench"
node_pool = "pool1"
region = "eu"
state_dir = "$WORK/nodes/$name/state"
root = "$root"
[tls]
ca = "$WORK/pki/ca.pem"
cert = "$WORK/pki/node-$name.pem"
key = "$WORK/pki/node-$name.key"
TOML
  "$BIN/upkeep-agent" --config "$WORK/nodes/$name/agent.toml" 2>"$WORK/nodes/$name/agent.log" &
  PIDS+=($!)
done
BIN="$BIN" NODES="$NODES" SWITCHES="$SWITCHES" python3 - <<'PY'
import json, os, statistics, subprocess, time
ctl = os.environ["BIN"] + "/upkeepctl"
nodes, switches = int(os.environ["NODES"]), int(os.environ["SWITCHES"])
def listing():
    out = subprocess.run([ctl, "node", "list", "--member", "bench", "-o", "json"], capture_output=True, text=True)
    return json.loads(out.stdout)["nodes"] if out.returncode == 0 else []
deadline = time.time() + 60
while sum(1 for n in listing() if n["status"] == "Ready") < nodes:
    if time.time() > deadline: raise SystemExit("channel-switch: nodes did not register within 60 s")
    time.sleep(0.2)
order = ["None", "Unmanaged", "SecurityPatch", "NodeImage"]
samples = []
for k in range(switches):
    channel = order[k % len(order)]
    t0 = int(time.time() * 1000)
    subprocess.run([ctl, "member", "set-channel", "bench", channel], check=True, capture_output=True)
    deadline = time.time() + 60
    while True:
        ns = listing()
        done = [n for n in ns if n["channel"] == channel]
        if len(done) == nodes: break
        time.sleep(0.01)
        if time.time() > deadline: raise SystemExit(f"channel-switch: {len(done)}/{nodes} nodes in force after 60 s")
    # Upper bound: the time the poll saw every node in force (one poll costs one upkeepctl call, ~20-40 ms).
    lat = [int(time.time() * 1000) - t0]
    samples += lat
    print(f"switch {k+1} -> {channel}: all {nodes} nodes in force after {lat[0]} ms")
result = {"benchmark": "channel-switch", "nodes": nodes, "switches": switches,
          "median_ms": statistics.median(samples), "p90_ms": sorted(samples)[int(0.9 * (len(samples) - 1))],
          "max_ms": max(samples)}
# What every results JSON records (issue 14): the commit, the machine and its load.
commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
result.update({"commit": commit + ("-dirty" if dirty.strip() else ""),
               "machine": {"cpu": cpu, "cpus": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3]}})
print(json.dumps(result))
os.makedirs("bench/results", exist_ok=True)
json.dump(result, open("bench/results/channel-switch.json", "w"), indent=2)
PY
