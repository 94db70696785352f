#!/usr/bin/env bash
# vs-durability.sh: rawblock's durability figures (bench durability) beside
# XFS doing the same synced small writes (fio), on the same device, and one
# table of medians with the targets.
#
#   hack/vs-durability.sh DEV|loop [ROUNDS]
#
# DEV must be a scratch block device: EVERYTHING ON IT IS DESTROYED (mkfs.xfs,
# rawblock format). With "loop" the script makes one itself
# (hack/loopdev.sh up ${LOOP_SIZE:-4G}) and removes it when it exits. The
# script refuses a device that is mounted, holds mounted partitions or is in
# use as swap. ROUNDS (default 3, at most 20) rounds alternate which side
# goes first, so drift does not favour one of them.
#
# Per round:
#   kernel:   mkfs.xfs, mount, then
#             fio --rw=randwrite --bs=4k --fsync=1 --numjobs=16 --size=64M
#                 --time_based --runtime=$RUNTIME --ioengine=psync
#             (16 files, a write + fsync loop in each), umount; IOPS.
#   rawblock: bench durability DEV --force: Object.Sync latency with 10 vs
#             100,000 objects, 16 goroutines each doing a 4k write +
#             Object.Sync to its own object for $RUNTIME (and the same with
#             Syncs serialized), journal blocks per Sync, and Open after a
#             real crash with 100,000 objects and the journal 45% full.
#
# mkfs.xfs runs with -K (no discard): on a loop device discard punches holes
# in the backing file, after which writes pay for backing-file allocation;
# rawblock never discards. For the same reason DEV is written once end to end
# before measuring (PREFILL=0 skips this).
#
# Environment: RUNTIME (seconds per timed run, default 10), PREFILL (1),
# LOOP_SIZE (4G), DURABILITY_ARGS (extra arguments for bench durability).
set -euo pipefail

prog=${0##*/}
die() {
	echo "$prog: $*" >&2
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || {
	echo "usage: $prog DEV|loop [ROUNDS]" >&2
	exit 2
}
dev=$1
rounds=${2:-3}
runtime=${RUNTIME:-10}
prefill=${PREFILL:-1}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$rounds'"
((rounds <= 20)) || die "ROUNDS $rounds: at most 20 (each round takes a minute or two)"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds, not '$runtime'"
((runtime <= 600)) || die "RUNTIME $runtime: at most 600 seconds"
[ "$(id -u)" -eq 0 ] || die "needs root (losetup, mkfs, mount, drop_caches)"

root=$(cd "$(dirname "$0")/.." && pwd)
for cmd in fio mkfs.xfs python3; do
	if ! command -v "$cmd" >/dev/null 2>&1; then
		"$root/hack/install-deps.sh"
		break
	fi
done
for cmd in fio mkfs.xfs python3 blockdev findmnt lsblk mountpoint go; do
	command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vs-durability.XXXXXX")
mnt=$tmp/mnt
mkdir "$mnt"
made_loop=
cleanup() {
	local ok=1
	if mountpoint -q "$mnt" 2>/dev/null; then
		umount "$mnt" 2>/dev/null || umount -l "$mnt" || ok=0
	fi
	if [ -n "$made_loop" ]; then
		"$root/hack/loopdev.sh" down "$made_loop" || echo "$prog: could not remove loop device $made_loop" >&2
	fi
	if [ "$ok" = 1 ]; then
		# --one-file-system: never descend into a mount that would not go.
		rm -rf --one-file-system -- "$tmp"
	else
		echo "$prog: could not unmount $mnt; left $tmp in place" >&2
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$dev" = loop ]; then
	made_loop=$("$root/hack/loopdev.sh" up "${LOOP_SIZE:-4G}") || die "hack/loopdev.sh up failed"
	dev=$made_loop
	echo "$prog: using loop device $dev" >&2
fi
[ -e "$dev" ] || die "$dev does not exist"
[ -b "$dev" ] || die "$dev is not a block device (this script runs mkfs on it; use 'loop' or hack/loopdev.sh up 4G)"
dev=$(readlink -f -- "$dev")

# Refuse a device in use: mounted itself, a mounted partition, or swap.
if findmnt -rn -S "$dev" >/dev/null 2>&1; then
	die "$dev is mounted ($(findmnt -rn -o TARGET -S "$dev" | head -1)); refusing to destroy it"
fi
if lsblk -nrpo MOUNTPOINT "$dev" 2>/dev/null | grep -q .; then
	die "$dev or one of its partitions is mounted; refusing to destroy it"
fi
if awk 'NR > 1 {print $1}' /proc/swaps | xargs -r readlink -f -- | grep -qx -- "$dev"; then
	die "$dev is in use as swap; refusing to destroy it"
fi
devsize=$(blockdev --getsize64 "$dev")
((devsize >= 2 << 30)) || die "$dev has $devsize bytes; need at least 2 GiB (16 × 64 MiB files, 100,000 objects and a full journal)"

(cd "$root" && go build -o "$tmp/bench" ./cmd/bench) || die "building cmd/bench failed"

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# flushes prints how many flush requests DEV has completed (the 16th
# statistics field of /proc/diskstats, kernel 5.5+). fio lays its files out
# before its clock starts, so the count includes that; the layout uses
# fallocate, which flushes nothing by itself.
flushes() {
	awk -v n="${dev##*/}" '$3 == n {print $19; found = 1} END {exit !found}' /proc/diskstats ||
		die "${dev##*/} not in /proc/diskstats"
}

# kernel_side ROUND: XFS + fio, 16 jobs of 4k randwrite + fsync.
kernel_side() {
	local r=$1 out=$tmp/xfs.$1
	echo "round $r/$rounds: XFS, fio randwrite 4k fsync=1 numjobs=16, ${runtime}s ..." >&2
	mkfs.xfs -f -K -q "$dev" >"$out.mkfs" 2>&1 || die "mkfs.xfs failed: $(cat "$out.mkfs")"
	mount "$dev" "$mnt" || die "mount $dev $mnt failed"
	drop_caches
	flushes >"$out.flushes"
	fio --name=x --directory="$mnt" --rw=randwrite --bs=4k --fsync=1 --numjobs=16 --size=64M \
		--time_based --runtime="$runtime" --ioengine=psync --group_reporting \
		--output-format=json >"$out.json" 2>"$out.err" ||
		die "fio on XFS failed: $(cat "$out.err")"
	flushes >>"$out.flushes"
	umount "$mnt" || die "umount $mnt failed"
}

# rawblock_side ROUND: bench durability. A failure is recorded and shown in
# the report, not fatal.
rawblock_side() {
	local r=$1 out=$tmp/rb.$1
	echo "round $r/$rounds: rawblock, bench durability (${runtime}s runs) ..." >&2
	drop_caches
	# shellcheck disable=SC2086 # DURABILITY_ARGS is a list of words
	if ! "$tmp/bench" durability "$dev" --force --json --quiet --runtime "${runtime}s" \
		--jobs 16 --object-size 64M ${DURABILITY_ARGS:-} >"$out.json" 2>"$out.err"; then
		echo "$prog: bench durability failed: $(cat "$out.err")" >&2
		rm -f "$out.json"
	fi
}

if [ "$prefill" = 1 ]; then
	echo "prefilling all of $dev ($((devsize >> 20)) MiB) ..." >&2
	fio --name=prefill --filename="$dev" --ioengine=io_uring --direct=1 --rw=write \
		--bs=1M --iodepth=16 --size=100% --output-format=terse >/dev/null 2>"$tmp/prefill.err" ||
		die "prefilling $dev failed: $(cat "$tmp/prefill.err")"
fi

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
start=$SECONDS
for ((r = 1; r <= rounds; r++)); do
	if ((r % 2)); then
		kernel_side "$r"
		rawblock_side "$r"
	else
		rawblock_side "$r"
		kernel_side "$r"
	fi
done
elapsed=$((SECONDS - start))

cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
name=${dev#/dev/}
echo
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "kernel: $(uname -r)"
echo "cpu: ${cpu:-unknown} ($(nproc) CPUs)"
echo "fio: $(fio --version)"
echo "device: $dev, $((devsize >> 20)) MiB$([ -r "/sys/block/$name/loop/backing_file" ] && echo ", loop on $(cat "/sys/block/$name/loop/backing_file") (dio=$(cat "/sys/block/$name/loop/dio"))")"
echo "$rounds rounds of ${runtime}s runs (medians; order alternates per round), ${elapsed}s; load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo

python3 - "$tmp" "$rounds" <<'PY'
import json, math, os, statistics, sys

tmp, rounds = sys.argv[1], int(sys.argv[2])
errors = []

def load_json(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before its JSON document.
    return json.loads(text[text.index("{"):])

def xfs(r):
    return load_json(f"{tmp}/xfs.{r}.json")["jobs"][0]["write"]["iops"]

def xfs_ops(r):
    return load_json(f"{tmp}/xfs.{r}.json")["jobs"][0]["write"]["total_ios"]

def xfs_flushes(r):
    with open(f"{tmp}/xfs.{r}.flushes") as f:
        a, b = map(int, f.read().split())
    return b - a

def rb(r):
    path = f"{tmp}/rb.{r}.json"
    if not os.path.exists(path):
        with open(f"{tmp}/rb.{r}.err") as f:
            errors.append(f"bench durability round {r} failed: {f.read().strip()}")
        return None
    return load_json(path)

R = range(1, rounds + 1)
kern = [xfs(r) for r in R]
kern_ops = [xfs_ops(r) for r in R]
kern_flushes = [xfs_flushes(r) for r in R]
docs = [rb(r) for r in R]

def get(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d

def vals(*keys):
    return [get(d, *keys) for d in docs]

def med(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else math.nan

def fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

conc = vals("concurrent", "concurrent", "ops_per_s")
ser = vals("concurrent", "serialized", "ops_per_s")
paired = [c / k if c is not None and k else None for c, k in zip(conc, kern)]
few_n, many_n = get(docs[0], "sync_latency", "few", "objects"), get(docs[0], "sync_latency", "many", "objects")
journal = [None if d is None else max(get(d, "sync_latency", "few", "journal_blocks_per_sync"),
                                      get(d, "sync_latency", "many", "journal_blocks_per_sync")) for d in docs]
rec_objs = get(docs[0], "recovery", "objects_after")
replayed = med(vals("recovery", "replayed_journal_bytes"))

rows = []
def row(measure, values, spec, target=None, good=None):
    m = med(values)
    verdict = ""
    if target is not None:
        verdict = target + ("" if math.isnan(m) else (" ok" if good(m) else " MISSED"))
    rows.append((measure, fmt(m, spec), " ".join(fmt(v, spec) for v in values), verdict))

row("XFS fio randwrite 4k fsync=1, 16 jobs (IOPS)", kern, ".0f")
row("rawblock 16 goroutines, 4k write + Object.Sync (ops/s)", conc, ".0f")
row("  ÷ XFS (per-round ratios; median)", paired, ".2f", "≥ 1.0", lambda x: x >= 1.0)
row("rawblock same, Syncs serialized (ops/s)", ser, ".0f")
row("  concurrent ÷ serialized", vals("concurrent", "ratio"), ".2f", "≥ 4", lambda x: x >= 4)
row(f"Object.Sync p50 after a 4k write, {few_n} objects (µs)", vals("sync_latency", "few", "sync_lat_us", "p50"), ".0f")
row(f"Object.Sync p50 after a 4k write, {many_n} objects (µs)", vals("sync_latency", "many", "sync_lat_us", "p50"), ".0f")
row(f"  {many_n} ÷ {few_n} objects", vals("sync_latency", "ratio"), ".2f", "≤ 1.5", lambda x: x <= 1.5)
row("journal blocks per 4k write + Sync", journal, ".2f", "≤ 2", lambda x: x <= 2)
row(f"recovery: Open after a crash, {rec_objs} objects, {fmt(replayed / 2**20, '.1f')} MiB of journal (s)",
    vals("recovery", "open_seconds"), ".3f", "≤ 1", lambda x: x <= 1)
row("  read + replay alone: fsck of the crashed device (s)", vals("recovery", "crash_fsck_seconds"), ".3f")
row("XFS device flushes per op", [f / k for f, k in zip(kern_flushes, kern_ops)], ".2f")
row("rawblock device flushes per op, 16 goroutines", vals("concurrent", "concurrent", "flushes_per_op"), ".2f")
row("rawblock device flushes per op, Syncs serialized", vals("concurrent", "serialized", "flushes_per_op"), ".2f")

w = [max(len(r[i]) for r in rows + [("measure", "median", "rounds", "target")]) for i in range(4)]
print(f"| {'measure':<{w[0]}} | {'median':>{w[1]}} | {'rounds':<{w[2]}} | {'target':<{w[3]}} |")
print(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 1)}:|{'-' * (w[2] + 2)}|{'-' * (w[3] + 2)}|")
for m, v, rs, t in rows:
    print(f"| {m:<{w[0]}} | {v:>{w[1]}} | {rs:<{w[2]}} | {t:<{w[3]}} |")
for e in errors:
    print("error:", e)
sys.exit(1 if errors else 0)
PY
