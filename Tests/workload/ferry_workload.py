#!/usr/bin/python3
"""Ferry workload generator and recovery-point correctness checker.

Run with /usr/bin/python3 (the interpreter that has libnbd's `nbd` module).

Subcommands
-----------
run       drive writes into NBD exports (one thread per volume), log every
          completed write as a JSON line.
check     prove that point images are exact prefixes of each volume's logged
          writes and, for group points, that the prefixes form a causal cut.
expected  write the raw image a volume holds after writes 1..K.
selftest  prove the checker passes good images and fails bad ones (synthetic
          images, then a real run against nbdkit).

Block content (why it looks like this)
--------------------------------------
Every written block is self-describing, so the checker can tell which write
it holds by reading the block alone, and the exact bytes are reproducible from
the log (content is never logged):

    offset  size   field
    0       8      magic b"FERRYWL1"
    8       4      volume number (u32 LE, index into the log's "volumes")
    12      4      number of volumes N (u32 LE)
    16      8      write index (u64 LE, per volume, starting at 1)
    24      8      block number (u64 LE, absolute block of this block)
    32      8*N    dependency vector (u64 LE each): for every other volume the
                   index of its latest write completed before this write was
                   issued; own entry = write index - 1
    32+8N   ...    filler: a 64-byte BLAKE2b digest of (seed, volume, index,
                   block) repeated to the end of the block

The seed is in the filler so that a block left over from a *different* run on
the same export does not pass as valid data.  Zero operations (h.zero) leave
all-zero blocks.  A multi-block write carries one header per block (with that
block's number), so every block is verifiable on its own.

Log format (JSON lines)
-----------------------
line 1:  {"format": "ferry-workload-1", "volumes": [ids], "uris": [...],
          "block_size": B, "blocks": N, "seed": S, "header_size": H}
then, one line per completed operation, in completion order:
          {"v": vol, "i": index, "op": "write"|"zero", "block": first,
           "count": nblocks, "deps": [per-volume indices]}
A volume's lines appear in index order (each volume issues one op at a time).
"""

import argparse
import bisect
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

MAGIC = b"FERRYWL1"
FORMAT = "ferry-workload-1"
_FIXED = struct.Struct("<8sIIQQ")  # magic, vol, nvol, index, block
READ_CHUNK = 4 * 1024 * 1024
MAX_BLOCK_MSGS = 20  # per image, so a wholesale mismatch stays readable
NBD_URI_RE = re.compile(r"^nbds?(\+[a-z]+)?://", re.I)


class UsageError(Exception):
    """Bad arguments or unreadable inputs: exit status 2."""


# --------------------------------------------------------------------------
# Content functions (shared by run, check, expected and selftest)
# --------------------------------------------------------------------------

def header_size(nvol):
    return _FIXED.size + 8 * nvol


def block_content(seed, vol, index, block, deps, block_size):
    """Exact bytes of `block` as written by write `index` of volume `vol`."""
    nvol = len(deps)
    hdr = _FIXED.pack(MAGIC, vol, nvol, index, block) + struct.pack("<%dQ" % nvol, *deps)
    digest = hashlib.blake2b(struct.pack("<QIQQ", seed & (2**64 - 1), vol, index, block),
                             digest_size=64).digest()
    fill = block_size - len(hdr)
    return hdr + (digest * (fill // 64 + 1))[:fill]


def write_content(seed, vol, index, block, count, deps, block_size):
    return b"".join(block_content(seed, vol, index, block + j, deps, block_size)
                    for j in range(count))


# --------------------------------------------------------------------------
# Log model
# --------------------------------------------------------------------------

class VolumeHistory:
    """Everything the checker needs about one volume, precomputed once."""

    def __init__(self, vol, vid, nblocks, nvol):
        self.vol = vol
        self.id = vid
        self.nvol = nvol
        # ops[i] for i in 1..n: (is_data, first_block, count, deps); ops[0] unused
        self.ops = [None]
        self.block_hist = [[] for _ in range(nblocks)]  # per block: sorted op indices
        self.depmax = None  # depmax[i][u]: max deps[u] over writes 1..i

    @property
    def n(self):
        return len(self.ops) - 1

    def finish(self):
        cur = [0] * self.nvol
        self.depmax = [tuple(cur)]
        for i in range(1, self.n + 1):
            deps = self.ops[i][3]
            # deps are monotone by construction; the running max makes the
            # cut check robust even if they were not.
            cur = [max(a, b) for a, b in zip(cur, deps)]
            self.depmax.append(tuple(cur))

    def state_at(self, block, k):
        """Block content after writes 1..k: data write index, or 0 for zeroes."""
        hist = self.block_hist[block]
        pos = bisect.bisect_right(hist, k)
        if pos == 0:
            return 0
        w = hist[pos - 1]
        return w if self.ops[w][0] else 0

    def describe_state(self, block, k):
        hist = self.block_hist[block]
        pos = bisect.bisect_right(hist, k)
        if pos == 0:
            return "zeroes (never written)"
        w = hist[pos - 1]
        return "write %d" % w if self.ops[w][0] else "zeroes (zeroed by write %d)" % w


class WorkloadLog:
    def __init__(self, path):
        try:
            with open(path, "r") as f:
                lines = f.read().split("\n")
        except OSError as e:
            raise UsageError("cannot read log %s: %s" % (path, e))
        try:
            hdr = json.loads(lines[0])
            self.volumes = list(hdr["volumes"])
            self.block_size = int(hdr["block_size"])
            self.blocks = int(hdr["blocks"])
            self.seed = int(hdr["seed"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise UsageError("log %s: bad header line: %s" % (path, e))
        self.nvol = len(self.volumes)
        self.area = self.blocks * self.block_size
        self.hist = [VolumeHistory(v, vid, self.blocks, self.nvol)
                     for v, vid in enumerate(self.volumes)]
        body = [l for l in lines[1:] if l.strip()]
        for n, line in enumerate(body):
            try:
                r = json.loads(line)
            except ValueError:
                if n == len(body) - 1:
                    # A torn last line (writer killed mid-append) is ignored.
                    print("warning: ignoring torn last log line", file=sys.stderr)
                    break
                raise UsageError("log %s: bad line %d" % (path, n + 2))
            h = self.hist[r["v"]]
            if r["i"] != h.n + 1:
                raise UsageError("log %s: volume %s index %d out of order (expected %d)"
                                 % (path, h.id, r["i"], h.n + 1))
            is_data = r["op"] == "write"
            h.ops.append((is_data, r["block"], r["count"], tuple(r["deps"])))
            for b in range(r["block"], r["block"] + r["count"]):
                h.block_hist[b].append(r["i"])
        for h in self.hist:
            h.finish()
        self.by_id = {h.id: h for h in self.hist}

    def content(self, h, w, block):
        return block_content(self.seed, h.vol, w, block, h.ops[w][3], self.block_size)


# --------------------------------------------------------------------------
# Image access
# --------------------------------------------------------------------------

def is_nbd_uri(s):
    return bool(NBD_URI_RE.match(s))


def read_image(spec, want):
    """Return (image size, first min(want, size) bytes) of a file or NBD URI."""
    if is_nbd_uri(spec):
        import nbd
        h = nbd.NBD()
        try:
            h.connect_uri(spec)
            size = h.get_size()
            n = min(want, size)
            parts, off = [], 0
            while off < n:
                c = min(READ_CHUNK, n - off)
                parts.append(h.pread(c, off))
                off += c
            try:
                h.shutdown()
            except nbd.Error:
                pass
            return size, b"".join(parts)
        except nbd.Error as e:
            raise UsageError("cannot read %s: %s" % (spec, e))
    try:
        with open(spec, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 and not os.path.isfile(spec):  # block device
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
            return size, f.read(min(want, size))
    except OSError as e:
        raise UsageError("cannot read %s: %s" % (spec, e))


# --------------------------------------------------------------------------
# Checker
# --------------------------------------------------------------------------

class ImageResult:
    def __init__(self):
        self.valid = []       # all k with replay(k) == image, ascending
        self.closest = None   # best k when no k matches (for messages)
        self.violations = []


def check_image(log, h, spec):
    """Prefix check of one image against volume history `h`."""
    res = ImageResult()
    bs, nb = log.block_size, log.blocks
    vid = h.id
    size, data = read_image(spec, log.area + bs)
    if size < log.area:
        res.violations.append("%s: image is %d bytes, smaller than the workload area (%d bytes)"
                              % (vid, size, log.area))
        return res
    # Bytes right after the area must be zero (nothing writes there).
    tail = data[log.area:]
    if tail.count(0) != len(tail):
        res.violations.append("%s: bytes after the workload area (offset %d..%d) are not zero"
                              % (vid, log.area, log.area + len(tail) - 1))

    # 1. Classify every block: obs[b] = write index from its header, 0 for an
    #    all-zero block, -1 for anything unrecognisable.  The byte-exact
    #    comparison of header-bearing blocks happens here too.
    zero_block = bytes(bs)
    obs = [0] * nb
    bad_msgs = []
    unpack = _FIXED.unpack_from
    for b in range(nb):
        off = b * bs
        if data.startswith(MAGIC, off):
            _, v, nvol, w, blk = unpack(data, off)
            if v != h.vol or nvol != log.nvol or blk != b:
                obs[b] = -1
                other = log.volumes[v] if v < len(log.volumes) else "volume #%d" % v
                bad_msgs.append("%s: block %d holds %s write %d of block %d (misplaced data)"
                                % (vid, b, other, w, blk))
            elif w > h.n:
                obs[b] = w
                bad_msgs.append("%s: block %d holds write %d, which is not in the log (%d writes logged)"
                                % (vid, b, w, h.n))
            else:
                obs[b] = w
                if data[off:off + bs] != log.content(h, w, b):
                    what = "was never a data write to this block" if h.state_at(b, w) != w else \
                        "content differs from the write's bytes (corrupted, torn, or from another run)"
                    bad_msgs.append("%s: block %d has a header of write %d but %s"
                                    % (vid, b, w, what))
        elif data[off:off + bs] != zero_block:
            obs[b] = -1
            bad_msgs.append("%s: block %d holds unrecognised non-zero data (no workload header)"
                            % (vid, b))
    res.violations += bad_msgs[:MAX_BLOCK_MSGS]
    if len(bad_msgs) > MAX_BLOCK_MSGS:
        res.violations.append("%s: ... and %d more bad blocks" % (vid, len(bad_msgs) - MAX_BLOCK_MSGS))

    # 2. Find every k with replay(k) == obs.  Any k below the highest header
    #    index M is impossible (that block needs write M).  Above M, only zero
    #    ops can follow (a data op > M would leave a header > M), so walk
    #    forward from M through consecutive zero ops, updating the set of
    #    blocks that disagree.  Exact, O(blocks + trailing zero ops).
    m = max(obs) if nb else 0
    if m <= h.n:
        cur = [h.state_at(b, m) for b in range(nb)]
        mism = {b for b in range(nb) if cur[b] != obs[b]}
        if not mism:
            res.valid.append(m)
        k = m + 1
        while k <= h.n and not h.ops[k][0]:
            _, first, count, _ = h.ops[k]
            for b in range(first, first + count):
                if obs[b] == 0:
                    mism.discard(b)
                else:
                    mism.add(b)
            if not mism:
                res.valid.append(k)
            k += 1
    if res.valid:
        if bad_msgs:  # a matching prefix but corrupted bytes: still a failure
            res.closest, res.valid = res.valid[-1], []
        return res

    # 3. No prefix matches: find the closest prefix (fewest differing blocks,
    #    latest on ties) by replaying the whole log once, and name the blocks.
    #    The fast path above only extends the highest index seen through trailing zero
    #    ops; a data write whose blocks a later zero op wiped leaves no trace either, so
    #    every k where the replay matches exactly is a valid prefix too.
    cur = [0] * nb
    diff = sum(1 for b in range(nb) if obs[b] != 0)
    best_k, best = 0, diff
    exact = [0] if diff == 0 else []
    for k in range(1, h.n + 1):
        is_data, first, count, _ = h.ops[k]
        new = k if is_data else 0
        for b in range(first, first + count):
            diff += (new != obs[b]) - (cur[b] != obs[b])
            cur[b] = new
        if diff <= best:
            best_k, best = k, diff
        if diff == 0:
            exact.append(k)
    res.closest = best_k
    if best == 0:
        if not bad_msgs:
            res.valid, res.closest = exact, None
        return res  # otherwise only content corruption, already reported above
    res.violations.append("%s: image matches no prefix of the %d logged writes; closest is 1..%d "
                          "with %d differing block(s)" % (vid, h.n, best_k, best))
    msgs = []
    for b in range(nb):
        exp = h.state_at(b, best_k)
        if exp != obs[b]:
            if obs[b] > 0:
                held = "write %d" % obs[b]
            elif obs[b] == 0:
                held = "zeroes"
            else:
                held = "unrecognised data"
            msgs.append("%s: block %d holds %s but the prefix through %d says %s"
                        % (vid, b, held, best_k, h.describe_state(b, best_k)))
    res.violations += msgs[:MAX_BLOCK_MSGS]
    if len(msgs) > MAX_BLOCK_MSGS:
        res.violations.append("%s: ... and %d more differing blocks" % (vid, len(msgs) - MAX_BLOCK_MSGS))
    return res


def check_cut(log, results):
    """Causal-cut check for a group set.

    Interpretation when an image matches several prefixes (trailing zero ops):
    it passes if ANY choice of one matching k per volume is a causal cut.  We
    compute the least such choice as a fixed point: start every volume at its
    smallest matching k and, while some write k_A of A depends on a write of B
    beyond k_B, raise k_B to B's smallest matching k that covers it.  Raising
    only ever increases dependencies (deps are monotone), so if this fails no
    choice works.  Returns (chosen k per id, violations).
    """
    ids = [vid for vid in results if results[vid].valid]
    k = {vid: results[vid].valid[0] for vid in ids}
    changed = True
    while changed:
        changed = False
        for a in ids:
            ha = log.by_id[a]
            for b in ids:
                if a == b:
                    continue
                need = ha.depmax[k[a]][log.by_id[b].vol]
                if need > k[b]:
                    valid = results[b].valid
                    pos = bisect.bisect_left(valid, need)
                    if pos < len(valid):
                        k[b] = valid[pos]
                        changed = True
    violations = []
    for a in ids:
        ha = log.by_id[a]
        for b in ids:
            if a == b:
                continue
            u = log.by_id[b].vol
            if ha.depmax[k[a]][u] > k[b]:
                # earliest write of A that reaches beyond B's cut
                j = next(j for j in range(1, k[a] + 1) if ha.ops[j][3][u] > k[b])
                violations.append("%s write %d depends on %s write %d, outside the cut "
                                  "(%s holds 1..%d, %s holds 1..%d)"
                                  % (a, j, b, ha.ops[j][3][u], b, k[b], a, k[a]))
    return k, violations


def check_set(log, s):
    images = s.get("images") or {}
    if not isinstance(images, dict):
        raise UsageError("set %r: images must be an object {volume id: image}" % s.get("point"))
    for vid in images:
        if vid not in log.by_id:
            raise UsageError("set %r: volume %r is not in the log (volumes: %s)"
                             % (s.get("point"), vid, ", ".join(log.volumes)))
    results = {vid: check_image(log, log.by_id[vid], spec) for vid, spec in images.items()}
    violations = []
    for r in results.values():
        violations += r.violations
    chosen = {vid: (r.valid[0] if r.valid else None) for vid, r in results.items()}
    if s.get("group"):
        k, cut_v = check_cut(log, results)
        chosen.update(k)
        violations += cut_v
        skipped = [vid for vid, r in results.items() if not r.valid]
        if skipped and len(results) > 1:
            violations.append("causal cut not checked for %s (no matching prefix)" % ", ".join(skipped))
    return {
        "point": s.get("point"),
        "group": bool(s.get("group")),
        "ok": not violations,
        "prefix": chosen,
        "prefix_range": {vid: ([r.valid[0], r.valid[-1]] if r.valid else None)
                         for vid, r in results.items()},
        "closest": {vid: r.closest for vid, r in results.items() if not r.valid},
        "violations": violations,
    }


def cmd_check(args):
    log = WorkloadLog(args.log)
    try:
        with open(args.sets) as f:
            sets = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError("cannot read sets %s: %s" % (args.sets, e))
    if isinstance(sets, dict):
        sets = [sets]
    t0 = time.monotonic()
    out = [check_set(log, s) for s in sets]
    report = {
        "sets": out,
        "totals": {"sets": len(out), "violations": sum(len(s["violations"]) for s in out),
                   "failed_sets": sum(1 for s in out if not s["ok"]),
                   "seconds": round(time.monotonic() - t0, 3)},
    }
    text = json.dumps(report, indent=1)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")
    if not args.quiet:
        print(text)
    return 0 if report["totals"]["violations"] == 0 else 1


# --------------------------------------------------------------------------
# expected
# --------------------------------------------------------------------------

def write_expected(log, h, k, size, out):
    """Raw image of volume h after writes 1..k; zero blocks are left as holes."""
    if k > h.n:
        raise UsageError("%s has only %d logged writes (asked for prefix %d)" % (h.id, h.n, k))
    bs = log.block_size
    with open(out, "wb") as f:
        f.truncate(size)
        for b in range(log.blocks):
            w = h.state_at(b, k)
            if w and b * bs < size:
                f.seek(b * bs)
                f.write(log.content(h, w, b)[:size - b * bs])


def cmd_expected(args):
    log = WorkloadLog(args.log)
    if args.volume not in log.by_id:
        raise UsageError("volume %r is not in the log" % args.volume)
    write_expected(log, log.by_id[args.volume], args.prefix,
                   args.size if args.size is not None else log.area, args.out)
    return 0


# --------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------

class Runner:
    def __init__(self, args):
        self.args = args
        self.ids, self.uris = [], []
        for spec in args.volume:
            vid, sep, uri = spec.partition("=")
            if not sep or not vid or not uri:
                raise UsageError("--volume wants ID=URI, got %r" % spec)
            if vid in self.ids:
                raise UsageError("duplicate volume id %r" % vid)
            self.ids.append(vid)
            self.uris.append(uri)
        self.nvol = len(self.ids)
        self.bs, self.blocks = args.block_size, args.blocks
        if self.bs < header_size(self.nvol) or self.bs % 512:
            raise UsageError("block size must be a multiple of 512 and >= %d" % header_size(self.nvol))
        if self.blocks < 2:
            raise UsageError("need at least 2 blocks")
        self.seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        # One lock protects the completed-write table and the log so that a
        # write is published to other volumes' deps together with its line.
        self.lock = threading.Lock()
        self.latest = [0] * self.nvol
        self.counts = [0] * self.nvol
        self.zeros = [0] * self.nvol
        self.stop = threading.Event()
        self.errors = []

    def worker(self, v, h):
        rng = random.Random(self.seed * 1000003 + v)
        period = 1.0 / self.args.rate if self.args.rate > 0 else 0.0
        nxt = time.monotonic()
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                r = rng.random()
                if r < 0.05:
                    op, count = "zero", 1
                elif r < 0.10:
                    op, count = "write", 2
                else:
                    op, count = "write", 1
                block = rng.randrange(self.blocks - count + 1)
                with self.lock:
                    deps = list(self.latest)
                deps[v] = i - 1
                off = block * self.bs
                if op == "zero":
                    h.zero(count * self.bs, off)
                else:
                    h.pwrite(write_content(self.seed, v, i, block, count, deps, self.bs), off)
                line = json.dumps({"v": v, "i": i, "op": op, "block": block,
                                   "count": count, "deps": deps}, separators=(",", ":"))
                with self.lock:
                    self.latest[v] = i
                    self.counts[v] = i
                    if op == "zero":
                        self.zeros[v] += 1
                    self.logf.write(line + "\n")
                    self.logf.flush()
                if period:
                    nxt += period
                    delay = nxt - time.monotonic()
                    if delay > 0:
                        self.stop.wait(delay)
                    elif delay < -1.0:
                        nxt = time.monotonic()  # fell far behind: don't burst
        except Exception as e:  # nbd.Error and anything unexpected
            with self.lock:
                self.errors.append("%s: write %d failed: %s" % (self.ids[v], i, e))
            self.stop.set()

    def run(self):
        import nbd
        handles = []
        for vid, uri in zip(self.ids, self.uris):
            h = nbd.NBD()
            try:
                h.connect_uri(uri)
                size = h.get_size()
            except nbd.Error as e:
                print("error: %s: cannot connect to %s: %s" % (vid, uri, e), file=sys.stderr)
                return 2
            if size < self.blocks * self.bs:
                print("error: %s: export is %d bytes, smaller than the area %d"
                      % (vid, size, self.blocks * self.bs), file=sys.stderr)
                return 2
            handles.append(h)
        self.logf = open(self.args.log, "w")
        self.logf.write(json.dumps({"format": FORMAT, "volumes": self.ids, "uris": self.uris,
                                    "block_size": self.bs, "blocks": self.blocks,
                                    "seed": self.seed, "header_size": header_size(self.nvol)}) + "\n")
        self.logf.flush()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        threads = [threading.Thread(target=self.worker, args=(v, h), daemon=True)
                   for v, h in enumerate(handles)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        ready = self.args.ready_file is None
        last_sync = t0
        while not self.stop.is_set():
            now = time.monotonic()
            if not ready and all(self.counts):
                open(self.args.ready_file, "a").close()
                ready = True
            if self.args.duration is not None and now - t0 >= self.args.duration:
                break
            if self.args.stop_file and os.path.exists(self.args.stop_file):
                break
            if now - last_sync >= 1.0:
                with self.lock:
                    os.fsync(self.logf.fileno())
                last_sync = now
            self.stop.wait(0.02)
        self.stop.set()
        for t in threads:
            t.join()
        for h in handles:
            try:
                h.shutdown()
            except Exception:
                pass
        self.logf.flush()
        os.fsync(self.logf.fileno())
        self.logf.close()
        if self.errors:
            for e in self.errors:
                print("error: " + e, file=sys.stderr)
            return 2
        print(json.dumps({"writes": dict(zip(self.ids, self.counts)),
                          "zeros": dict(zip(self.ids, self.zeros)),
                          "seconds": round(time.monotonic() - t0, 3),
                          "seed": self.seed, "log": self.args.log}))
        return 0


def cmd_run(args):
    return Runner(args).run()


# --------------------------------------------------------------------------
# selftest
# --------------------------------------------------------------------------

def synth_log(path, ids, blocks, bs, nops, seed):
    """Write a log as `run` would, with a random interleaving of volumes."""
    rng = random.Random(seed)
    latest = [0] * len(ids)
    with open(path, "w") as f:
        f.write(json.dumps({"format": FORMAT, "volumes": ids, "block_size": bs,
                            "blocks": blocks, "seed": seed}) + "\n")
        for _ in range(nops):
            v = rng.randrange(len(ids))
            i = latest[v] + 1
            r = rng.random()
            op, count = ("zero", 1) if r < 0.08 else ("write", 2) if r < 0.15 else ("write", 1)
            block = rng.randrange(blocks - count + 1)
            deps = list(latest)
            deps[v] = i - 1
            f.write(json.dumps({"v": v, "i": i, "op": op, "block": block, "count": count,
                                "deps": deps}) + "\n")
            latest[v] = i


def run_check(log, sets, tmp, name):
    sp = os.path.join(tmp, name + ".sets.json")
    with open(sp, "w") as f:
        json.dump(sets, f)
    l = WorkloadLog(log)
    return [check_set(l, s) for s in sets]


def selftest(args):
    tmp = tempfile.mkdtemp(prefix="ferry-wl-selftest-")
    failures = []
    passed = [0]

    def expect(name, cond, detail=""):
        if cond:
            passed[0] += 1
            print("PASS  " + name)
        else:
            failures.append(name)
            print("FAIL  " + name + ("\n      " + detail if detail else ""))

    try:
        # ---------------- synthetic ----------------
        ids = ["db/data", "app/data"]
        bs, blocks = 4096, 256
        logp = os.path.join(tmp, "synth.log")
        synth_log(logp, ids, blocks, bs, 3000, seed=7)
        log = WorkloadLog(logp)
        A, B = log.hist

        def img(h, k, name, skip=(), size=None, mutate=None):
            p = os.path.join(tmp, name)
            write_expected(log, h, k, size or log.area + bs, p)
            for w in skip:  # undo write w by rewriting its blocks as of k without it
                for b in range(h.ops[w][1], h.ops[w][1] + h.ops[w][2]):
                    hist = [x for x in h.block_hist[b] if x <= k and x != w]
                    last = hist[-1] if hist else 0
                    data = log.content(h, last, b) if last and h.ops[last][0] else bytes(bs)
                    with open(p, "r+b") as f:
                        f.seek(b * bs)
                        f.write(data)
            if mutate:
                with open(p, "r+b") as f:
                    mutate(f)
            return p

        def one(name, sets):
            return run_check(logp, sets, tmp, name)

        # correct prefixes pass, for many k including 0 and the full log
        ks = sorted({0, 1, 2, A.n // 3, A.n // 2, A.n - 1, A.n})
        res = one("good", [{"point": "k%d" % k, "group": False,
                            "images": {"db/data": img(A, k, "a%d.img" % k)}} for k in ks])
        for k, r in zip(ks, res):
            ok = r["ok"] and r["prefix_range"]["db/data"][0] <= k <= r["prefix_range"]["db/data"][1]
            expect("prefix image k=%d passes and is found" % k, ok, json.dumps(r))

        # trailing zero ops: several k match; report the range
        zk = next(k for k in range(2, A.n) if not A.ops[k][0] and A.ops[k - 1][0])
        r = one("zr", [{"point": "z", "images": {"db/data": img(A, zk, "z.img")}}])[0]
        lo, hi = r["prefix_range"]["db/data"]
        expect("image after a zero op matches a k range containing %d" % zk,
               r["ok"] and lo <= zk - 1 <= hi and hi >= zk, json.dumps(r))

        # a data write whose blocks a later zero op wiped, after the highest index left in
        # the image: the image after the zero op is still a prefix
        # (a small volume, so zero ops often hit the newest writes)
        small_logp = os.path.join(tmp, "small.log")
        synth_log(small_logp, ["v"], 4, bs, 400, seed=11)
        small = WorkloadLog(small_logp)
        S = small.hist[0]

        def wiped_after_max(k):
            # a zero op k after a data write newer than anything left in the image at k
            if S.ops[k][0]:
                return False
            m = max(S.state_at(b, k) for b in range(4))
            return any(S.ops[j][0] for j in range(m + 1, k + 1))
        hz = next((k for k in range(3, S.n) if wiped_after_max(k)), None)
        expect("the small synthetic log has a write wiped by a later zero op", hz is not None)
        if hz is not None:
            p = os.path.join(tmp, "hz.img")
            write_expected(small, S, hz, small.area + bs, p)
            r = run_check(small_logp, [{"point": "hz", "images": {"v": p}}], tmp, "hz")[0]
            expect("an image whose newest writes a zero op wiped (at %d) still reads as a prefix" % hz,
                   r["ok"] and r["prefix_range"]["v"] is not None
                   and r["prefix_range"]["v"][0] <= hz <= r["prefix_range"]["v"][1], json.dumps(r))

        # write missing in the middle: k-1 absent, k present, different blocks
        # and write k-1's blocks not touched again by k
        def untouched_after(h, w, k):
            return all(h.state_at(b, k) == w for b in range(h.ops[w][1], h.ops[w][1] + h.ops[w][2]))
        mk = next(k for k in range(A.n // 2, A.n) if A.ops[k][0] and A.ops[k - 1][0]
                  and untouched_after(A, k - 1, k) and untouched_after(A, k, k))
        r = one("missing", [{"point": "m", "images": {"db/data": img(A, mk, "m.img", skip=[mk - 1])}}])[0]
        expect("missing write %d (write %d present) fails" % (mk - 1, mk),
               not r["ok"] and any("holds" in v and "says write %d" % (mk - 1) in v
                                   for v in r["violations"]), json.dumps(r["violations"]))
        print("      e.g. " + r["violations"][-1])

        # one flipped byte in a data block's filler, and one in a header
        fb = next(b for b in range(blocks) if A.state_at(b, A.n))
        for where, off in (("filler", fb * bs + 1000), ("header", fb * bs + 17)):
            def flip(f, off=off):
                f.seek(off)
                c = f.read(1)
                f.seek(off)
                f.write(bytes([c[0] ^ 0x01]))
            r = one("flip", [{"point": "f", "images": {"db/data": img(A, A.n, "f.img", mutate=flip)}}])[0]
            expect("one flipped byte (%s) fails" % where, not r["ok"], json.dumps(r))
            print("      e.g. " + r["violations"][0])

        # stale block: a block holds an older write than the prefix says
        sb = next(b for b in range(blocks)
                  if len([w for w in A.block_hist[b] if A.ops[w][0]]) >= 2 and A.state_at(b, A.n))
        old = [w for w in A.block_hist[sb] if A.ops[w][0] and w != A.state_at(sb, A.n)][-1]

        def stale(f):
            f.seek(sb * bs)
            f.write(log.content(A, old, sb))
        r = one("stale", [{"point": "s", "images": {"db/data": img(A, A.n, "s.img", mutate=stale)}}])[0]
        expect("stale block %d (write %d instead of %d) fails" % (sb, old, A.state_at(sb, A.n)),
               not r["ok"], json.dumps(r))
        print("      e.g. " + r["violations"][-1])

        # garbage, non-zero tail, short image
        def garbage(f):
            f.seek(5 * bs)
            f.write(b"\x55" * bs)
        r = one("g", [{"point": "g", "images": {"db/data": img(A, A.n, "g.img", mutate=garbage)}}])[0]
        expect("unrecognised block fails", not r["ok"], json.dumps(r))

        def tail(f):
            f.seek(log.area + 100)
            f.write(b"x")
        r = one("t", [{"point": "t", "images": {"db/data": img(A, A.n, "t.img", mutate=tail)}}])[0]
        expect("non-zero byte after the area fails", not r["ok"], json.dumps(r))
        r = one("short", [{"point": "sh", "images": {"db/data": img(A, A.n, "sh.img", size=log.area - bs)}}])[0]
        expect("image smaller than the area fails", not r["ok"], json.dumps(r))
        r = one("exact", [{"point": "ex", "images": {"db/data": img(A, A.n, "ex.img", size=log.area)}}])[0]
        expect("image exactly the area size passes", r["ok"], json.dumps(r))

        # wrong volume's image
        r = one("wrong", [{"point": "w", "images": {"db/data": img(B, B.n, "wv.img")}}])[0]
        expect("the other volume's image fails", not r["ok"], json.dumps(r))

        # causal cut: A write ka (data, visible) depends on B write d (data);
        # B's image holds only 1..d-1 -> group fails, non-group passes.
        ka = next(k for k in range(A.n, 0, -1) if A.ops[k][0] and untouched_after(A, k, k)
                  and A.ops[k][3][1] > 1 and B.ops[A.ops[k][3][1]][0])
        d = A.ops[ka][3][1]
        ia, ib = img(A, ka, "ca.img"), img(B, d - 1, "cb.img")
        rg, rn = one("cut", [{"point": "g", "group": True, "images": {"db/data": ia, "app/data": ib}},
                             {"point": "n", "group": False, "images": {"db/data": ia, "app/data": ib}}])
        expect("group set with B lacking A's dependency (B write %d) fails" % d,
               not rg["ok"] and any("outside the cut" in v for v in rg["violations"]), json.dumps(rg))
        print("      e.g. " + (rg["violations"] or ["?"])[0])
        expect("same images with group=false pass", rn["ok"], json.dumps(rn))
        # consistent group cut: B at d, A at the last write whose deps[B] <= d
        ka2 = max(k for k in range(A.n + 1) if A.depmax[k][1] <= d)
        kb2 = max(d, A.depmax[ka2][1])
        # and B's deps on A must be covered too: pick B's prefix <= kb2 whose deps fit
        while B.depmax[kb2][0] > ka2:
            kb2 -= 1
        r = one("cutok", [{"point": "c", "group": True,
                           "images": {"db/data": img(A, ka2, "okA.img"), "app/data": img(B, kb2, "okB.img")}}])[0]
        expect("consistent group set (A 1..%d, B 1..%d) passes" % (ka2, kb2), r["ok"], json.dumps(r))
        # subset: a group set may cover only some volumes
        r = one("subset", [{"point": "one", "group": True, "images": {"app/data": img(B, 10, "b10.img")}}])[0]
        expect("group set covering one volume passes", r["ok"], json.dumps(r))

        # the CLI end to end (exit codes, report file)
        me = os.path.abspath(__file__)
        sp = os.path.join(tmp, "cli.sets.json")
        rp = os.path.join(tmp, "cli.report.json")
        with open(sp, "w") as f:
            json.dump([{"point": "ok", "group": True, "images": {"db/data": img(A, ka2, "okA.img"),
                                                                 "app/data": img(B, kb2, "okB.img")}}], f)
        p = subprocess.run([sys.executable, me, "check", "--log", logp, "--sets", sp, "--report", rp],
                           capture_output=True, text=True)
        expect("check CLI exits 0 on a good set", p.returncode == 0 and os.path.exists(rp), p.stderr)
        with open(sp, "w") as f:
            json.dump([{"point": "bad", "group": True, "images": {"db/data": ia, "app/data": ib}}], f)
        p = subprocess.run([sys.executable, me, "check", "--log", logp, "--sets", sp],
                           capture_output=True, text=True)
        expect("check CLI exits 1 on a violation", p.returncode == 1, p.stderr)
        with open(sp, "w") as f:
            json.dump([{"point": "x", "images": {"nope": ia}}], f)
        p = subprocess.run([sys.executable, me, "check", "--log", logp, "--sets", sp],
                           capture_output=True, text=True)
        expect("check CLI exits 2 on an unknown volume", p.returncode == 2, p.stderr)

        # ---------------- real NBD ----------------
        if args.no_nbd:
            print("SKIP  NBD tests (--no-nbd)")
        elif not shutil.which("nbdkit"):
            print("SKIP  NBD tests (nbdkit not installed)")
        else:
            nbd_selftest(tmp, expect)
    finally:
        if args.keep:
            print("kept " + tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("%d passed, %d failed" % (passed[0], len(failures)))
    return 0 if not failures else 1


def nbd_selftest(tmp, expect):
    import nbd
    me = os.path.abspath(__file__)
    procs, socks = [], []
    try:
        for n in range(2):
            sock = os.path.join(tmp, "nbd%d.sock" % n)
            procs.append(subprocess.Popen(["nbdkit", "--unix", sock, "-f", "memory", "64M"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            socks.append(sock)
        deadline = time.monotonic() + 10
        while not all(os.path.exists(s) for s in socks) and time.monotonic() < deadline:
            time.sleep(0.05)
        uris = ["nbd+unix:///?socket=" + s for s in socks]
        ids = ["db/data", "app/data"]
        logp = os.path.join(tmp, "nbd.log")
        ready = os.path.join(tmp, "ready")
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, me, "run", "--log", logp, "--duration", "2",
                            "--rate", "300", "--seed", "11", "--ready-file", ready]
                           + sum((["--volume", "%s=%s" % (i, u)] for i, u in zip(ids, uris)), []),
                           capture_output=True, text=True)
        expect("run against two nbdkit exports for 2 s exits 0 (%.1fs): %s"
               % (time.monotonic() - t0, p.stdout.strip()), p.returncode == 0, p.stderr)
        expect("run touched the ready file", os.path.exists(ready))
        # Copy each volume while the workload is stopped.
        images = {}
        for vid, uri, n in zip(ids, uris, range(2)):
            size, data = read_image(uri, 64 * 1024 * 1024)
            path = os.path.join(tmp, "copy%d.img" % n)
            with open(path, "wb") as f:
                f.write(data)
            images[vid] = path
        log = WorkloadLog(logp)
        sets = [{"point": "copies", "group": True, "images": images},
                {"point": "live-nbd", "group": True, "images": dict(zip(ids, uris))}]
        res = [check_set(log, s) for s in sets]
        for r in res:
            ok = r["ok"] and all(r["prefix"][h.id] == h.n for h in log.hist)
            expect("check of %s finds the full logged prefix %s"
                   % (r["point"], {h.id: h.n for h in log.hist}), ok, json.dumps(r))
        zeros = sum(1 for h in log.hist for op in h.ops[1:] if not op[0])
        twos = sum(1 for h in log.hist for op in h.ops[1:] if op[2] == 2)
        expect("the run issued zero ops (%d) and 2-block writes (%d)" % (zeros, twos), zeros and twos)

        # a write landing after the copies makes the copy an older prefix
        h = nbd.NBD()
        h.connect_uri(uris[0])
        h.pwrite(bytes(b"\x01" * 4096), 0)
        h.shutdown()
        r = check_set(log, {"point": "tampered", "images": {"db/data": uris[0]}})
        expect("an export written outside the workload fails", not r["ok"], json.dumps(r))

        # stop-file stops the run
        stop = os.path.join(tmp, "stop")
        proc = subprocess.Popen([sys.executable, me, "run", "--log", logp + "2", "--rate", "0",
                                 "--stop-file", stop, "--volume", "db/data=" + uris[1]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        open(stop, "w").close()
        try:
            out, err = proc.communicate(timeout=10)
            expect("--stop-file stops a rate-0 run: %s" % out.strip(), proc.returncode == 0, err)
        except subprocess.TimeoutExpired:
            proc.kill()
            expect("--stop-file stops a rate-0 run", False, "timed out")
        r = check_set(WorkloadLog(logp + "2"), {"point": "rate0", "images": {"db/data": uris[1]}})
        expect("rate-0 run's export checks ok", r["ok"], json.dumps(r))

        # NBD error -> exit 2; a server dying mid-run -> exit 2
        p = subprocess.run([sys.executable, me, "run", "--log", logp + "3", "--duration", "1",
                            "--volume", "x=nbd+unix:///?socket=" + os.path.join(tmp, "nosuch.sock")],
                           capture_output=True, text=True)
        expect("run exits 2 when the export cannot be reached", p.returncode == 2, p.stderr)
        proc = subprocess.Popen([sys.executable, me, "run", "--log", logp + "4", "--duration", "10",
                                 "--volume", "db/data=" + uris[0]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        stop_process(procs[0])
        try:
            out, err = proc.communicate(timeout=15)
            expect("run exits 2 when the server dies mid-run: %s" % err.strip().splitlines()[-1:],
                   proc.returncode == 2, err)
        except subprocess.TimeoutExpired:
            proc.kill()
            expect("run exits 2 when the server dies mid-run", False, "timed out")
    finally:
        for pr in procs:
            if pr.poll() is None:
                stop_process(pr)


def stop_process(pr):
    """SIGTERM, then SIGKILL if it is still there after 3 s."""
    pr.terminate()
    try:
        pr.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pr.kill()
        pr.wait()


# --------------------------------------------------------------------------

def main(argv=None):
    # A parent that ignores SIGTERM (a test runner using signal sources does) passes that on
    # through exec; this process and what it starts must stop on SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="generate the workload")
    r.add_argument("--volume", action="append", required=True, metavar="ID=URI")
    r.add_argument("--log", required=True)
    r.add_argument("--blocks", type=int, default=1024)
    r.add_argument("--block-size", type=int, default=4096)
    r.add_argument("--rate", type=float, default=200, help="writes/s per volume, 0 = unpaced")
    r.add_argument("--seed", type=int)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--duration", type=float)
    g.add_argument("--stop-file")
    r.add_argument("--ready-file")

    c = sub.add_parser("check", help="check point image sets")
    c.add_argument("--log", required=True)
    c.add_argument("--sets", required=True)
    c.add_argument("--report")
    c.add_argument("--quiet", action="store_true", help="do not print the report on stdout")

    e = sub.add_parser("expected", help="write a volume's image after writes 1..K")
    e.add_argument("--log", required=True)
    e.add_argument("--volume", required=True)
    e.add_argument("--prefix", type=int, required=True)
    e.add_argument("--size", type=int, help="image size in bytes (default: the workload area)")
    e.add_argument("--out", required=True)

    s = sub.add_parser("selftest", help="prove the checker can fail")
    s.add_argument("--no-nbd", action="store_true", help="skip the nbdkit part")
    s.add_argument("--keep", action="store_true", help="keep the temp dir")

    args = ap.parse_args(argv)
    try:
        return {"run": cmd_run, "check": cmd_check, "expected": cmd_expected,
                "selftest": selftest}[args.cmd](args)
    except UsageError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
