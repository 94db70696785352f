#!/usr/bin/env bash
# vs-fio.sh: compare `bench raw` with fio on the same device, workload by
# workload, and print one markdown table.
#
#   hack/vs-fio.sh DEV [ROUNDS]
#
# DEV is OVERWRITTEN (its first SIZE bytes). ROUNDS (default 3) rounds per
# workload alternate fio and bench (and which of them goes first); the table
# shows medians. Environment:
#   RUNTIME   seconds per run (default 10)
#   SIZE      region of DEV used by both tools (default 1G)
#   FIO_OPTS  extra fio options (e.g. "--fixedbufs=1")
#   PREFILL   0 to skip writing the region once before measuring (default 1:
#             a fresh loop file or thin device would otherwise serve reads
#             of never-written blocks without any I/O)
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
runtime=${RUNTIME:-10}
size=${SIZE:-1G}
prefill=${PREFILL:-1}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, not '$rounds'"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds, not '$runtime'"
[[ $size =~ ^[1-9][0-9]*[KMGTkmgt]?$ ]] || die "SIZE must look like 1G or 512M, not '$size'"
[ -e "$dev" ] || die "$dev does not exist"
[ -b "$dev" ] || [ -f "$dev" ] || die "$dev is neither a block device nor a regular file"

root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v fio >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
	"$root/hack/install-deps.sh"
fi
command -v fio >/dev/null 2>&1 || die "fio not found"
command -v python3 >/dev/null 2>&1 || die "python3 not found"
command -v go >/dev/null 2>&1 || die "go not found (needed to build bench)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vs-fio.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$root" && go build -o "$tmp/bench" ./cmd/bench) || die "building cmd/bench failed"

# Both tools get the same workload options; fio keeps its defaults otherwise.
fio_run() { # rw bs iodepth out
	# shellcheck disable=SC2086 # FIO_OPTS is a list of options
	fio --name=vsfio --filename="$dev" --ioengine=io_uring --direct=1 \
		--rw="$1" --bs="$2" --iodepth="$3" --numjobs=1 --size="$size" \
		--runtime="$runtime" --time_based --group_reporting \
		--norandommap --randrepeat=0 --lat_percentiles=1 \
		--output-format=json ${FIO_OPTS:-} >"$4" ||
		die "fio $1 bs=$2 iodepth=$3 failed (output in $4)"
}

bench_run() { # rw bs iodepth out
	"$tmp/bench" raw --device "$dev" --rw "$1" --bs "$2" --iodepth "$3" --jobs 1 \
		--size "$size" --runtime "${runtime}s" --io io_uring --force --json >"$4" ||
		die "bench raw $1 bs=$2 iodepth=$3 failed"
}

if [ "$prefill" = 1 ]; then
	echo "prefilling the first $size of $dev ..." >&2
	fio --name=prefill --filename="$dev" --ioengine=io_uring --direct=1 --rw=write \
		--bs=1M --iodepth=16 --size="$size" --output-format=terse >/dev/null ||
		die "prefilling $dev failed"
fi

# name rw bs iodepth metric
workloads=(
	"randread-4k-qd32 randread 4k 32 iops"
	"randwrite-4k-qd32 randwrite 4k 32 iops"
	"write-1M-qd16 write 1M 16 mibps"
	"randread-4k-qd1 randread 4k 1 p50"
)
for w in "${workloads[@]}"; do
	read -r name rw bs qd _ <<<"$w"
	for ((r = 1; r <= rounds; r++)); do
		echo "$name round $r/$rounds ..." >&2
		# Alternate which tool goes first so drift (device warm-up, other
		# load on the machine) does not favour one of them.
		if ((r % 2)); then
			fio_run "$rw" "$bs" "$qd" "$tmp/fio.$name.$r.json"
			bench_run "$rw" "$bs" "$qd" "$tmp/bench.$name.$r.json"
		else
			bench_run "$rw" "$bs" "$qd" "$tmp/bench.$name.$r.json"
			fio_run "$rw" "$bs" "$qd" "$tmp/fio.$name.$r.json"
		fi
	done
done

cpu=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)
echo
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "kernel: $(uname -r)"
echo "cpu: ${cpu:-unknown} ($(nproc) CPUs)"
echo "fio: $(fio --version)"
echo "device: $dev, size $size, runtime ${runtime}s, $rounds rounds (medians)${FIO_OPTS:+, fio options: $FIO_OPTS}"
echo

python3 - "$tmp" "$rounds" "${workloads[@]}" <<'PY'
import json, statistics, sys

tmp, rounds, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def load(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before its JSON document.
    return json.loads(text[text.index("{"):])

def fio_metric(doc, rw, metric):
    job = doc["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    if metric == "iops":
        return side["iops"]
    if metric == "mibps":
        return side["bw_bytes"] / (1 << 20)
    pct = side.get("lat_ns", {}).get("percentile") or side["clat_ns"]["percentile"]
    return pct["50.000000"] / 1e3

def bench_metric(doc, metric):
    if metric == "iops":
        return doc["iops"]
    if metric == "mibps":
        return doc["mib_per_s"]
    return doc["lat_us"]["p50"]

units = {"iops": "IOPS", "mibps": "MiB/s", "p50": "p50 µs"}
print("| workload | fio | bench | ratio | target |")
print("|---|---:|---:|---:|---|")
rss, modes, detail = [], set(), []
for w in workloads:
    name, rw, bs, qd, metric = w.split()
    fs = [fio_metric(load(f"{tmp}/fio.{name}.{r}.json"), rw, metric) for r in range(1, rounds + 1)]
    docs = [load(f"{tmp}/bench.{name}.{r}.json") for r in range(1, rounds + 1)]
    bs_ = [bench_metric(d, metric) for d in docs]
    f, b = statistics.median(fs), statistics.median(bs_)
    show = lambda xs: " ".join(f"{x:.0f}" if metric == "iops" else f"{x:.1f}" for x in xs)
    detail.append(f"{rw} {bs} qd{qd} {units[metric]} per round: fio {show(fs)} | bench {show(bs_)}")
    modes.update(d["io_mode"] for d in docs)
    if qd == "32":
        rss += [d["max_rss_mib"] for d in docs]
    ratio = b / f if f else float("nan")
    if metric == "p50":
        ok, target = ratio <= 1.15, "≤ 1.15"
    elif metric == "mibps":
        ok, target = ratio >= 0.95, "≥ 0.95"
    else:
        ok, target = ratio >= 0.90, "≥ 0.90"
    fmt = "{:.1f}" if metric != "iops" else "{:.0f}"
    print(f"| {rw} {bs} qd{qd} ({units[metric]}) | {fmt.format(f)} | {fmt.format(b)} | {ratio:.2f} | {target} {'ok' if ok else 'MISSED'} |")
print()
for line in detail:
    print(line)
if rss:
    print(f"bench peak RSS at iodepth 32: {max(rss):.1f} MiB (max over rounds)")
print(f"bench I/O mode: {', '.join(sorted(modes))}")
PY
