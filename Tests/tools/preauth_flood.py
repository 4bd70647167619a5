#!/usr/bin/env python3
"""Pre-authentication load on a controller listener, from many source addresses.

    preauth_flood.py HOST:PORT CA ENROLL_FRAME_FILE IDLE ADDRESSES ENROLLMENTS SECONDS

Opens IDLE idle TCP connections spread over ADDRESSES source addresses (127.0.1.1, 127.0.1.2,
...; loopback addresses need no set-up), sends ENROLLMENTS bogus enrollments over TLS (the
frame in ENROLL_FRAME_FILE, without a client certificate) from the first source address, and
holds the idle connections for SECONDS. Prints "held" and a JSON object once it holds them: the
connections opened, and how the enrollments were answered.
"""
import json
import socket
import ssl
import struct
import sys
import threading
import time


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    ca, frame_file = sys.argv[2], sys.argv[3]
    idle, addresses, enrollments, seconds = (int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))
    held, opened = [], 0
    for i in range(idle):
        source = "127.0.1.%d" % (1 + i % addresses)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.bind((source, 0))
            s.connect((host, int(port)))
            held.append(s)
            opened += 1
        except OSError:
            s.close()
    frame = open(frame_file, "rb").read()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.check_hostname = False
    answers = {}
    for _ in range(enrollments):
        try:
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.settimeout(10)
            raw.bind(("127.0.2.1", 0))
            raw.connect((host, int(port)))
            with context.wrap_socket(raw) as conn:
                conn.sendall(frame)
                header = read_exact(conn, 4)
                body = read_exact(conn, struct.unpack(">I", header)[0]) if len(header) == 4 else b""
                key = "rate-limited" if b"too many failed enrollments" in body else ("refused" if body else "closed")
        except (OSError, ssl.SSLError):
            key = "closed"
        answers[key] = answers.get(key, 0) + 1
    print("held " + json.dumps({"opened": opened, "enrollments": answers}), flush=True)
    time.sleep(seconds)
    for s in held:
        s.close()


if __name__ == "__main__":
    main()
