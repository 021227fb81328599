#!/usr/bin/env bash
# Runs every scenario of issue 8 in priority order and leaves JSON in bench/results/. Takes ~25 minutes
# (the idle-agent window alone is 10 minutes). Build first (once; the release build takes minutes):
#   cargo build --release -p upkeep-hub -p upkeep-agent -p upkeep-bench
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/release/upkeep-bench
$B store --secs 10
# Issue 16: SQLite against PostgreSQL (a throwaway cluster from scripts/pg-cluster; needs PostgreSQL installed).
$B store-compare --secs 10 --rounds 5 --threads 1,4
$B scale --agents 1000
$B scale --agents 10000 --restart
# 50k needs RLIMIT_NOFILE > 50k for the hub and the generator; where the hard limit is lower, run the largest
# that fits (19,500 under a 20,000 hard limit) with: $B scale --agents 19500
$B scale --agents "${BENCH_MAX_AGENTS:-50000}"
$B orchestrate --nodes 10000 --members 1000 --stages 3 --group-concurrency 10
$B heartbeats --agents 1000 --secs 30
$B replicas --agents 10000 --replicas 3
$B agent-idle --secs "${BENCH_IDLE_SECS:-600}"
