#!/usr/bin/env bash
# vs-kernel.sh: compare rawblock with the kernel's file systems (XFS, ext4)
# and with the raw device (fio), workload by workload, and print one
# markdown table of medians plus every round's raw values.
#
#   hack/vs-kernel.sh DEV [ROUNDS]
#
# DEV must be a scratch block device (e.g. from `hack/loopdev.sh up 4G`):
# EVERYTHING ON IT IS DESTROYED (mkfs, raw writes, rawblock format). The
# script refuses a device that is mounted, holds mounted partitions or is in
# use as swap. ROUNDS (default 3) rounds alternate which side (kernel/fio or
# rawblock) goes first, so drift does not favour one of them. The engine's
# two sequential-write workloads last a fraction of a second against fio's
# 10 s ceiling, so each round runs them REPS times (default 3) and their
# medians pool every run: five single short runs sampled the device's
# fast and slow moments too coarsely for a stable median.
#
# Workloads (per round):
#   1. seqwrite 4k, 8 files/objects × 64 MiB, 8 jobs, then sync: XFS and
#      ext4 through fio (psync, end_fsync), rawblock through `bench run`.
#      The raw device's ceiling is fio write 1M at iodepth 16 (io_uring,
#      O_DIRECT, 10 s); for information, fio also writes the engine's I/O
#      pattern itself (8 streams × 64 MiB in separate regions, 16 in flight).
#   2. seqwrite 1M, 1 object × 1 GiB (512 MiB if DEV < 2 GiB), 1 job, then
#      sync, against the same raw ceiling; and, for information, against
#      fio writing the same bytes once, where the engine's data region
#      starts (a loop device over a file serves the ceiling's rewrites of
#      one region faster than a single pass over fresh blocks).
#   3. randread 4k over 1 GiB (8 × a 128 MiB cache), 32 jobs, 10 s, against
#      fio randread 4k at iodepth 32 on the raw device.
#   4. randread 4k, 32 MiB data set in a 256 MiB cache, 2 jobs, 5 s.
#   5. append + Object.Sync after every 4k write, 8 objects × 4000 KiB.
#
# Two departures from the plainest fio/mkfs invocations, both for fairness:
#   - mkfs runs without discard (mkfs.xfs -K, mkfs.ext4 -E nodiscard): on a
#     loop device discard punches holes in the backing file, after which
#     writes pay for backing-file allocation and reads of holes do no I/O;
#     rawblock never discards, so every side sees the same allocated blocks.
#     For the same reason DEV is written once end to end before measuring
#     (PREFILL=0 skips this).
#   - fio runs with --fallocate=none: by default fio preallocates each file
#     before writing, which would hand XFS/ext4 one extent per file for free
#     and turn the workload into unwritten-extent conversion. An application
#     that appends does not preallocate, and rawblock's extents come from
#     delayed allocation alone.
#
# Kernel-side MiB/s is 512 MiB / wall time of the fio command (end_fsync
# included; fio's own bandwidth excludes the fsync). Machine CPU seconds are
# busy jiffies (user+nice+system+irq+softirq+steal, all CPUs) from
# /proc/stat across the run, for both sides; they include anything else
# running on the machine.
set -euo pipefail

prog=${0##*/}
die() {
	echo "$prog: $*" >&2
	exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || {
	echo "usage: $prog DEV [ROUNDS]" >&2
	exit 2
}
dev=$1
rounds=${2:-3}
prefill=${PREFILL:-1}
reps=${REPS:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$rounds'"
((rounds <= 20)) || die "ROUNDS $rounds: at most 20 (each round takes about a minute)"
[[ $reps =~ ^[1-9]$ ]] || die "REPS must be 1..9, not '$reps'"
[ "$(id -u)" -eq 0 ] || die "needs root (mkfs, mount, drop_caches)"
[ -e "$dev" ] || die "$dev does not exist"
[ -b "$dev" ] || die "$dev is not a block device (this script runs mkfs on it; use hack/loopdev.sh up 4G)"
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

root=$(cd "$(dirname "$0")/.." && pwd)
for cmd in fio mkfs.xfs mkfs.ext4 filefrag python3; do
	if ! command -v "$cmd" >/dev/null 2>&1; then
		"$root/hack/install-deps.sh"
		break
	fi
done
for cmd in fio mkfs.xfs mkfs.ext4 filefrag python3 blockdev findmnt lsblk mountpoint go; do
	command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found"
done

devsize=$(blockdev --getsize64 "$dev")
min_size=$((1536 << 20))
((devsize >= min_size)) || die "$dev has $devsize bytes; need at least 1.5 GiB (1 GiB random-read data set plus metadata)"
if ((devsize >= 2 << 30)); then
	big=1G
	big_bytes=$((1 << 30))
else
	big=512M
	big_bytes=$((512 << 20))
fi
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vs-kernel.XXXXXX")
mnt=$tmp/mnt
mkdir "$mnt"
cleanup() {
	local ok=1
	if mountpoint -q "$mnt" 2>/dev/null; then
		umount "$mnt" 2>/dev/null || umount -l "$mnt" || ok=0
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

(cd "$root" && go build -o "$tmp/bench" ./cmd/bench) || die "building cmd/bench failed"

# busy prints the machine's busy CPU jiffies so far.
busy() {
	awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat
}

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# kernel_fs FS ROUND: mkfs FS on DEV, 8 × 64 MiB sequential 4k writes
# through fio, then umount. Writes $tmp/FS.ROUND.{json,txt}.
kernel_fs() {
	local fs=$1 r=$2 out=$tmp/$1.$2
	case $fs in
	xfs) mkfs.xfs -f -K -q "$dev" >"$out.mkfs" 2>&1 || die "mkfs.xfs failed: $(cat "$out.mkfs")" ;;
	ext4) mkfs.ext4 -F -q -E nodiscard "$dev" >"$out.mkfs" 2>&1 || die "mkfs.ext4 failed: $(cat "$out.mkfs")" ;;
	*) die "internal error: unknown file system $fs" ;;
	esac
	mount "$dev" "$mnt" || die "mount $dev $mnt failed"
	drop_caches
	local b0 b1 t0 t1
	b0=$(busy)
	t0=$EPOCHREALTIME
	fio --name=seq --directory="$mnt" --rw=write --bs=4k --numjobs=8 --size=64M \
		--ioengine=psync --end_fsync=1 --fallocate=none --group_reporting \
		--output-format=json >"$out.json" 2>"$out.err" ||
		die "fio seqwrite on $fs failed: $(cat "$out.err")"
	t1=$EPOCHREALTIME
	b1=$(busy)
	local f n files=0
	: >"$out.txt"
	for f in "$mnt"/seq.*; do
		[ -f "$f" ] || continue
		n=$(filefrag "$f" | awk '{for (i = 1; i < NF; i++) if ($(i + 1) ~ /^extents?$/) print $i}')
		[[ $n =~ ^[0-9]+$ ]] || die "filefrag $f: unexpected output: $(filefrag "$f")"
		echo "extents $n" >>"$out.txt"
		files=$((files + 1))
	done
	((files == 8)) || die "fio on $fs left $files files, want 8: $(ls "$mnt")"
	{
		echo "t0 $t0"
		echo "t1 $t1"
		echo "busy $(((b1 - b0)))"
	} >>"$out.txt"
	umount "$mnt" || die "umount $mnt failed"
}

# fio_raw NAME RW BS IODEPTH ROUND: fio on the raw device, 10 s over 1 GiB.
fio_raw() {
	local out=$tmp/$1.$5
	drop_caches
	fio --name="$1" --filename="$dev" --rw="$2" --bs="$3" --iodepth="$4" \
		--ioengine=io_uring --direct=1 --size=1G --runtime=10 --time_based \
		--numjobs=1 --norandommap --randrepeat=0 --group_reporting \
		--output-format=json >"$out.json" 2>"$out.err" ||
		die "fio $2 bs=$3 iodepth=$4 on $dev failed: $(cat "$out.err")"
}

# fio_raw_pass ROUND: fio raw write 1M at iodepth 16, one pass over as many
# bytes as the engine's seqwrite 1M writes, from 128 MiB in (where a
# default layout's data region starts on a 4 GiB device). fio_raw's
# ceiling rewrites the same 1 GiB for 10 s, which this device (a loop
# device over a file of a virtual disk) serves faster than fresh blocks.
fio_raw_pass() {
	local out=$tmp/rawpass.$1
	drop_caches
	fio --name=rawpass --filename="$dev" --rw=write --bs=1M --iodepth=16 \
		--ioengine=io_uring --direct=1 --offset=128M --size="$big" --io_size="$big" \
		--numjobs=1 --group_reporting --output-format=json >"$out.json" 2>"$out.err" ||
		die "fio one-pass write 1M on $dev failed: $(cat "$out.err")"
}

# fio_raw_streams ROUND: the engine's seqwrite 4k as the device sees it,
# issued by fio: 8 sequential streams of 64 MiB, each in its own region
# (spread over the device from 128 MiB in, like the engine's placement),
# 1 MiB writes, 2 in flight per stream (16 in all, the engine's writeback
# depth), one pass. It prices what the device charges for that pattern
# (eight fresh regions, a 0.2 s run), which the steady 10 s ceiling does not.
fio_raw_streams() {
	local out=$tmp/rawstreams.$1 inc
	inc=$((((devsize - (128 << 20)) / 8) >> 20 << 20))
	drop_caches
	fio --name=rawstreams --filename="$dev" --rw=write --bs=1M --iodepth=2 \
		--ioengine=io_uring --direct=1 --offset=128M --offset_increment="$inc" \
		--size=64M --numjobs=8 --group_reporting --output-format=json >"$out.json" 2>"$out.err" ||
		die "fio 8 streams write 1M on $dev failed: $(cat "$out.err")"
}

# rb NAME ROUND ARGS...: one `bench run` on a freshly formatted DEV. A
# failure is recorded (NAME.ROUND.err) and shown in the report, not fatal.
rb() {
	local out=$tmp/$1.$2
	shift 2
	drop_caches
	if ! "$tmp/bench" run --device "$dev" --format --force --json --quiet "$@" >"$out.json" 2>"$out.err"; then
		echo "$prog: bench run $* failed: $(cat "$out.err")" >&2
		rm -f "$out.json"
	fi
}

kernel_side() {
	local r=$1
	echo "round $r/$rounds: kernel XFS seqwrite 4k ..." >&2
	kernel_fs xfs "$r"
	echo "round $r/$rounds: kernel ext4 seqwrite 4k ..." >&2
	kernel_fs ext4 "$r"
	echo "round $r/$rounds: fio raw write 1M qd16 ..." >&2
	fio_raw rawwrite write 1M 16 "$r"
	echo "round $r/$rounds: fio raw write 1M, 8 streams × 64M ..." >&2
	fio_raw_streams "$r"
	echo "round $r/$rounds: fio raw write 1M qd16, one pass of $big ..." >&2
	fio_raw_pass "$r"
	echo "round $r/$rounds: fio raw randread 4k qd32 ..." >&2
	fio_raw rawrandread randread 4k 32 "$r"
}

rawblock_side() {
	local r=$1
	local k
	for ((k = 1; k <= reps; k++)); do
		echo "round $r/$rounds: rawblock seqwrite 4k 8×64M ($k/$reps) ..." >&2
		rb seq4k "$r.$k" --workload seqwrite --bs 4k --objects 8 --size 64M --jobs 8 --runtime 120s
		echo "round $r/$rounds: rawblock seqwrite 1M 1×$big ($k/$reps) ..." >&2
		rb seq1m "$r.$k" --workload seqwrite --bs 1M --objects 1 --size "$big" --jobs 1 --runtime 120s
	done
	echo "round $r/$rounds: rawblock randread 4k 8×128M cache 128M ..." >&2
	rb randread "$r" --workload randread --bs 4k --objects 8 --size 128M --jobs 32 --cache 128M --runtime 10s
	echo "round $r/$rounds: rawblock randread 4k cached ..." >&2
	rb cached "$r" --workload randread --bs 4k --objects 1 --size 32M --jobs 2 --cache 256M --runtime 5s
	echo "round $r/$rounds: rawblock append+Sync ..." >&2
	rb append "$r" --workload seqwrite --bs 4k --objects 8 --size 4000k --jobs 8 --sync-every 1 --runtime 300s
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
echo
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "kernel: $(uname -r)"
echo "cpu: ${cpu:-unknown} ($(nproc) CPUs)"
echo "fio: $(fio --version)"
echo "device: $dev, $((devsize >> 20)) MiB$([ -r "/sys/block/${dev#/dev/}/loop/backing_file" ] && echo ", loop on $(cat "/sys/block/${dev#/dev/}/loop/backing_file") (dio=$(cat "/sys/block/${dev#/dev/}/loop/dio"))")"
echo "$rounds rounds (medians; order alternates per round; engine seqwrite runs $reps× per round), ${elapsed}s; load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo

python3 - "$tmp" "$rounds" "$hz" "$big_bytes" "$reps" <<'PY'
import json, math, os, statistics, sys

tmp, rounds, hz, big, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
MiB, GiB = 1 << 20, 1 << 30
KERNEL_BYTES = 8 * 64 * MiB
errors = []

def load_json(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before its JSON document.
    return json.loads(text[text.index("{"):])

def kernel(fs, r):
    base = f"{tmp}/{fs}.{r}"
    doc = load_json(base + ".json")
    w = doc["jobs"][0]["write"]
    if w["io_bytes"] != KERNEL_BYTES:
        errors.append(f"{fs} round {r}: fio wrote {w['io_bytes']} bytes, want {KERNEL_BYTES}")
    ext, vals = [], {}
    with open(base + ".txt") as f:
        for line in f:
            k, v = line.split()
            if k == "extents":
                ext.append(int(v))
            else:
                vals[k] = float(v)
    wall = vals["t1"] - vals["t0"]
    cpu = vals["busy"] / hz
    return {
        "mibps": KERNEL_BYTES / MiB / wall,
        "fio_mibps": w["bw_bytes"] / MiB,
        "wall": wall,
        "cpu": cpu,
        "cpu_gib": cpu / (KERNEL_BYTES / GiB),
        "extents": sum(ext) / len(ext),
    }

def fio_raw(name, r, rw):
    doc = load_json(f"{tmp}/{name}.{r}.json")
    side = doc["jobs"][0]["write" if "write" in rw else "read"]
    return {"mibps": side["bw_bytes"] / MiB, "iops": side["iops"]}

def rb(name, r, want_bytes=None):
    path = f"{tmp}/{name}.{r}.json"
    if not os.path.exists(path):
        with open(f"{tmp}/{name}.{r}.err") as f:
            errors.append(f"rawblock {name} round {r} failed: {f.read().strip()}")
        return None
    d = load_json(path)
    if want_bytes is not None and d["bytes"] != want_bytes:
        errors.append(f"rawblock {name} round {r}: wrote {d['bytes']} bytes, want {want_bytes} (runtime cut it short?)")
    return d

R = range(1, rounds + 1)
xfs = [kernel("xfs", r) for r in R]
ext4 = [kernel("ext4", r) for r in R]
rawwrite = [fio_raw("rawwrite", r, "write") for r in R]
rawread = [fio_raw("rawrandread", r, "randread") for r in R]
rawpass = [fio_raw("rawpass", r, "write") for r in R]
rawstreams = [fio_raw("rawstreams", r, "write") for r in R]
# The engine's sequential writes take a fraction of a second each, so each
# round runs them REPS times back to back and the medians pool every run.
seq4k = [rb("seq4k", f"{r}.{k}", 8 * 64 * MiB) for r in R for k in range(1, reps + 1)]
seq1m = [rb("seq1m", f"{r}.{k}", big) for r in R for k in range(1, reps + 1)]
rread = [rb("randread", r) for r in R]
cached = [rb("cached", r) for r in R]
append = [rb("append", r, 8 * 4000 * 1024) for r in R]

def col(docs, key):
    return [d[key] for d in docs if d is not None]

def med(xs):
    return statistics.median(xs) if xs else math.nan

def fmt(x, spec):
    return "—" if x is None else ("n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec))

rows = []
def row(measure, k, b, spec, target, ok, ratio=None):
    rows.append((measure, fmt(k, spec), fmt(b, spec), fmt(ratio, ".2f"),
                 target + ("" if ok is None else (" ok" if ok else " MISSED"))))

def cmp(measure, kvals, bvals, spec, target, good):
    k, b = med(kvals), med(bvals)
    ratio = b / k if k else math.nan
    ok = None if good is None or math.isnan(ratio) else good(ratio)
    row(measure, k, b, spec, target, ok, ratio)

rb4k = col(seq4k, "mib_per_s")
cmp("seqwrite 4k 8×64M, 8 jobs (MiB/s) vs XFS", col(xfs, "mibps"), rb4k, ".1f", "≥ 1.25", lambda x: x >= 1.25)
cmp("seqwrite 4k 8×64M, 8 jobs (MiB/s) vs ext4", col(ext4, "mibps"), rb4k, ".1f", "info", None)
cmp("seqwrite 4k 8×64M, 8 jobs (MiB/s) vs fio raw write 1M qd16", col(rawwrite, "mibps"), rb4k, ".1f", "≥ 0.80", lambda x: x >= 0.80)
cmp("seqwrite 4k 8×64M, 8 jobs (MiB/s) vs fio raw write 1M, the same 8 streams × 64M", col(rawstreams, "mibps"), rb4k, ".1f", "info", None)
cmp("machine CPU s per GiB, seqwrite 4k, vs XFS", col(xfs, "cpu_gib"), col(seq4k, "machine_cpu_s_per_gib"), ".2f", "≤ 0.60", lambda x: x <= 0.60)
cmp("extents per object, seqwrite 4k, vs XFS", col(xfs, "extents"), col(seq4k, "extents_per_object"), ".2f", "rawblock = 1", None)
rows[-1] = rows[-1][:4] + ("rawblock = 1" + (" ok" if med(col(seq4k, "extents_per_object")) <= 1 else " MISSED"),)
cmp(f"seqwrite 1M 1×{big // MiB}M, 1 job (MiB/s) vs fio raw write 1M qd16", col(rawwrite, "mibps"), col(seq1m, "mib_per_s"), ".1f", "≥ 0.90", lambda x: x >= 0.90)
cmp(f"seqwrite 1M 1×{big // MiB}M, 1 job (MiB/s) vs fio raw write 1M qd16, one pass of {big // MiB}M", col(rawpass, "mibps"), col(seq1m, "mib_per_s"), ".1f", "info", None)
cmp("randread 4k 1G = 8×cache, 32 jobs (IOPS) vs fio raw randread 4k qd32", col(rawread, "iops"), col(rread, "iops"), ".0f", "≥ 0.80", lambda x: x >= 0.80)
b = med(col(cached, "iops"))
row("randread 4k all cached, 2 jobs (reads/s)", None, b, ",.0f", "≥ 1,000,000", None if math.isnan(b) else b >= 1e6)
b = med(col(seq4k, "write_amplification"))
row("device bytes written / bytes written, seqwrite 4k", None, b, ".3f", "≤ 1.02", None if math.isnan(b) else b <= 1.02)
b = med(col(append, "extents_per_object"))
row("append+Sync every 4k write, extents per object", None, b, ".2f", "≤ 16", None if math.isnan(b) else b <= 16)

print("| measure | kernel/fio | rawblock | ratio | target |")
print("|---|---:|---:|---:|---|")
for r_ in rows:
    print("| " + " | ".join(r_) + " |")

def show(docs, key, spec):
    vals = ["ERR" if d is None else format(d[key], spec) for d in docs]
    if len(docs) == rounds * reps and reps > 1:
        # One group per round, its runs joined by '/'.
        return " ".join("/".join(vals[i:i + reps]) for i in range(0, len(vals), reps))
    return " ".join(vals)

def hits(docs):
    return " ".join("ERR" if d is None else f"{d['cache_hits']}/{d['cache_misses']}" for d in docs)

print()
print("per round (round 1 first):")
print(f"  XFS  seqwrite 4k MiB/s (wall, fsync incl.): {show(xfs, 'mibps', '.1f')}  (fio's own bw: {show(xfs, 'fio_mibps', '.1f')})")
print(f"  XFS  machine CPU s: {show(xfs, 'cpu', '.2f')}  per GiB: {show(xfs, 'cpu_gib', '.2f')}  extents/file: {show(xfs, 'extents', '.2f')}")
print(f"  ext4 seqwrite 4k MiB/s (wall, fsync incl.): {show(ext4, 'mibps', '.1f')}  (fio's own bw: {show(ext4, 'fio_mibps', '.1f')})")
print(f"  ext4 machine CPU s: {show(ext4, 'cpu', '.2f')}  per GiB: {show(ext4, 'cpu_gib', '.2f')}  extents/file: {show(ext4, 'extents', '.2f')}")
print(f"  fio raw write 1M qd16 MiB/s: {show(rawwrite, 'mibps', '.1f')}")
print(f"  fio raw write 1M, 8 streams × 64M, MiB/s: {show(rawstreams, 'mibps', '.1f')}")
print(f"  fio raw write 1M qd16, one pass, MiB/s: {show(rawpass, 'mibps', '.1f')}")
print(f"  fio raw randread 4k qd32 IOPS: {show(rawread, 'iops', '.0f')}")
print(f"  rawblock seqwrite 4k MiB/s: {show(seq4k, 'mib_per_s', '.1f')}  machine CPU s: {show(seq4k, 'machine_cpu_s', '.2f')}"
      f"  per GiB: {show(seq4k, 'machine_cpu_s_per_gib', '.2f')}  process CPU s: {show(seq4k, 'process_cpu_s', '.2f')}")
print(f"  rawblock seqwrite 4k extents/object: {show(seq4k, 'extents_per_object', '.2f')}  write amp: {show(seq4k, 'write_amplification', '.3f')}")
print(f"  rawblock seqwrite 1M MiB/s: {show(seq1m, 'mib_per_s', '.1f')}  extents/object: {show(seq1m, 'extents_per_object', '.2f')}  write amp: {show(seq1m, 'write_amplification', '.3f')}")
print(f"  rawblock randread 8×cache IOPS: {show(rread, 'iops', '.0f')}  p99 µs: {show([d and d['lat_us'] for d in rread], 'p99', '.1f')}"
      f"  cache hits/misses: {hits(rread)}")
print(f"  rawblock randread cached reads/s: {show(cached, 'iops', '.0f')}"
      f"  cache hits/misses: {hits(cached)}")
print(f"  rawblock append+Sync extents/object: {show(append, 'extents_per_object', '.2f')}  MiB/s: {show(append, 'mib_per_s', '.1f')}"
      f"  write amp: {show(append, 'write_amplification', '.3f')}")
modes = sorted({d["io_mode"] for d in seq4k + seq1m + rread + cached + append if d is not None})
print(f"  rawblock I/O mode: {', '.join(modes) or 'n/a'}")
if errors:
    print()
    print("problems:")
    for e in errors:
        print("  " + e)
PY
