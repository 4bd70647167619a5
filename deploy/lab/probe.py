#!/usr/bin/env python3
"""Network probes for the Ferry lab (deploy/lab/selftest.sh), standard library only.

Run inside a lab namespace (lab.sh exec HOST -- python3 probe.py ...):
  ping DEST [--source ADDR] [--timeout S]     one ICMP echo (raw socket, root); exit 0 on a reply
  connect HOST PORT [--timeout S]             one TCP connect; prints how long it took or failed
  sink --bind ADDR --port P                   TCP server: reads each connection to EOF, answers
                                              with the byte count, closes (runs until killed)
  send HOST PORT --bytes N [--timeout S]      sends N bytes to a sink, waits for its answer;
                                              prints "BYTES SECONDS MBITPS"
Exit status: 0 success, 1 failure (unreachable, refused, timed out), 2 usage.
"""
import argparse
import errno
import os
import select
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def cmd_ping(a) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if a.source:
        s.bind((a.source, 0))
    ident = os.getpid() & 0xFFFF
    payload = b"ferry-lab-probe"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + payload), ident, 1) + payload
    start = time.monotonic()
    try:
        s.sendto(pkt, (a.dest, 0))
    except OSError as e:
        print(f"ping {a.dest}: {e.strerror}")
        return 1
    deadline = start + a.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"ping {a.dest}: no reply in {a.timeout:g}s")
            return 1
        r, _, _ = select.select([s], [], [], left)
        if not r:
            continue
        data, addr = s.recvfrom(4096)
        ihl = (data[0] & 0x0F) * 4
        typ, code = data[ihl], data[ihl + 1]
        if typ == 0:
            rid, = struct.unpack("!H", data[ihl + 4:ihl + 6])
            if rid == ident and addr[0] == a.dest:
                print(f"ping {a.dest}: reply in {(time.monotonic() - start) * 1000:.1f} ms")
                return 0
        elif typ in (3, 11):  # unreachable / time exceeded about one of our echoes
            inner = data[ihl + 8:]
            if len(inner) >= 28:
                iihl = (inner[0] & 0x0F) * 4
                rid, = struct.unpack("!H", inner[iihl + 4:iihl + 6])
                if inner[iihl] == 8 and rid == ident:
                    what = "unreachable" if typ == 3 else "time exceeded"
                    print(f"ping {a.dest}: {what} (code {code}) from {addr[0]}")
                    return 1


def cmd_connect(a) -> int:
    start = time.monotonic()
    try:
        with socket.create_connection((a.host, a.port), timeout=a.timeout):
            pass
    except OSError as e:
        why = e.strerror or ("timed out" if isinstance(e, socket.timeout) else str(e))
        name = errno.errorcode.get(e.errno, "") if e.errno else "TIMEOUT"
        print(f"connect {a.host}:{a.port}: failed after {time.monotonic() - start:.3f}s: {name} {why}")
        return 1
    print(f"connect {a.host}:{a.port}: connected in {time.monotonic() - start:.3f}s")
    return 0


def cmd_sink(a) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, a.port))
    srv.listen(8)
    while True:
        c, _ = srv.accept()
        with c:
            n = 0
            while True:
                b = c.recv(1 << 16)
                if not b:
                    break
                n += len(b)
            c.sendall(f"{n}\n".encode())


def cmd_send(a) -> int:
    chunk = b"\0" * (1 << 16)
    start = time.monotonic()
    try:
        with socket.create_connection((a.host, a.port), timeout=a.timeout) as c:
            left = a.bytes
            while left > 0:
                k = min(left, len(chunk))
                c.sendall(chunk[:k])
                left -= k
            c.shutdown(socket.SHUT_WR)
            answer = b""
            while True:
                b = c.recv(64)
                if not b:
                    break
                answer += b
    except OSError as e:
        print(f"send {a.host}:{a.port}: {e}")
        return 1
    secs = time.monotonic() - start
    got = int(answer or b"0")
    if got != a.bytes:
        print(f"send {a.host}:{a.port}: sink got {got} of {a.bytes} bytes")
        return 1
    print(f"{got} {secs:.3f} {got * 8 / secs / 1e6:.1f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("ping")
    q.add_argument("dest")
    q.add_argument("--source")
    q.add_argument("--timeout", type=float, default=1.0)
    q.set_defaults(fn=cmd_ping)
    q = sub.add_parser("connect")
    q.add_argument("host")
    q.add_argument("port", type=int)
    q.add_argument("--timeout", type=float, default=3.0)
    q.set_defaults(fn=cmd_connect)
    q = sub.add_parser("sink")
    q.add_argument("--bind", required=True)
    q.add_argument("--port", type=int, required=True)
    q.set_defaults(fn=cmd_sink)
    q = sub.add_parser("send")
    q.add_argument("host")
    q.add_argument("port", type=int)
    q.add_argument("--bytes", type=int, required=True)
    q.add_argument("--timeout", type=float, default=10.0)
    q.set_defaults(fn=cmd_send)
    a = p.parse_args()
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
