#!/usr/bin/env python3
"""JSON helpers for deploy/lab/dr-cycle.sh (standard library only).

  get EXPR [FILE] [--last LOG] print eval(EXPR) with j = the JSON document (FILE or stdin)
                               (and last = {volume: its last logged write} of a workload LOG);
                               None prints as an empty line, lists one item a line
  steps FILE                   a job's steps, one line each: state, name [group], detail or error
  report FILE                  a job's report, "key=value" one a line (sorted)
  sets OUT POINT GROUP ID=URI...   write a checker sets file: one set, group true|false
  prefixes LOG REPORT [--full] summarise a checker report against its log, one line per image:
                               "ID k=K of N"; exit 1 if the set failed, or (--full) if an
                               image does not hold every logged write of its volume
  points FILE SINCE            how many points (ferryctl points --json) are newer than the
                               epoch seconds SINCE
"""
import datetime
import json
import sys


def load(path=None):
    if path is None or path == "-":
        return json.load(sys.stdin)
    with open(path) as f:
        return json.load(f)


def cmd_get(args):
    expr = args[0]
    env = {"json": json}
    if "--last" in args:  # --last LOG: `last` = the last logged write of each workload volume
        i = args.index("--last")
        env["last"] = last_indices(args[i + 1])
        args = args[:i] + args[i + 2:]
    env["j"] = load(args[1] if len(args) > 1 else None)
    v = eval(expr, env)  # noqa: S307 -- our own expressions
    if v is None:
        print("")
    elif isinstance(v, (list, tuple)):
        for x in v:
            print(x)
    elif isinstance(v, (dict,)):
        print(json.dumps(v, sort_keys=True))
    else:
        print(v)
    return 0


def cmd_steps(args):
    j = load(args[0])
    for s in j.get("steps", []):
        what = s.get("error") or s.get("detail") or ""
        grp = s.get("group")
        name = s["name"] + (" [%s]" % grp if grp else "")
        print("  %-8s %-36s %s" % (s["state"], name, what))
    return 0


def cmd_report(args):
    j = load(args[0])
    for k in sorted(j.get("report", {})):
        print("  %s=%s" % (k, j["report"][k]))
    return 0


def cmd_sets(args):
    out, point, group = args[0], args[1], args[2] == "true"
    images = {}
    for a in args[3:]:
        k, _, v = a.partition("=")
        images[k] = v
    with open(out, "w") as f:
        json.dump([{"point": point, "group": group, "images": images}], f, indent=1)
    return 0


def last_indices(log):
    """Per volume id: the index of its last logged operation."""
    with open(log) as f:
        header = json.loads(f.readline())
        last = [0] * len(header["volumes"])
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                op = json.loads(line)
            except ValueError:
                continue  # a torn last line
            last[op["v"]] = max(last[op["v"]], op["i"])
    return dict(zip(header["volumes"], last))


def cmd_prefixes(args):
    log, report, full = args[0], args[1], "--full" in args[2:]
    last = last_indices(log)
    r = load(report)
    bad = 0
    for s in r["sets"]:
        if not s["ok"]:
            bad += 1
        for vid in sorted(s["prefix"]):
            k = s["prefix"][vid]
            rng = s.get("prefix_range", {}).get(vid)
            n = last.get(vid, 0)
            holds_all = rng is not None and rng[0] <= n <= rng[1]
            mark = ""
            if full and not holds_all:
                bad += 1
                mark = "  <- NOT every logged write"
            print("  %-9s holds writes 1..%s of %d%s%s" % (
                vid, k if k is not None else "?", n,
                " (any of %d..%d)" % tuple(rng) if rng and rng[0] != rng[1] else "", mark))
        for v in s["violations"][:10]:
            print("  violation: %s" % v)
    return 1 if bad else 0


def cmd_points(args):
    j = load(args[0])
    since = float(args[1])
    pts = j.get("points", j) if isinstance(j, dict) else j
    n = 0
    for p in pts:
        if not p.get("complete", True):
            continue
        t = p.get("createdAt") or p.get("time") or p.get("takenAt")
        if not t:
            continue
        ts = datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        if ts > since:
            n += 1
    print(n)
    return 0


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"get": cmd_get, "steps": cmd_steps, "report": cmd_report, "sets": cmd_sets,
          "prefixes": cmd_prefixes, "points": cmd_points}.get(cmd)
    if fn is None:
        print("drtool.py: unknown command %r" % cmd, file=sys.stderr)
        return 2
    return fn(args)


if __name__ == "__main__":
    sys.exit(main())
