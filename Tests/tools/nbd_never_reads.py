#!/usr/bin/env python3
"""An NBD-over-TLS client that asks for data and never reads it.

    nbd_never_reads.py HOST:PORT EXPORT LENGTH SECONDS CA CERT KEY SERVER_NAME

Negotiates (STARTTLS, then GO for EXPORT), then sends READ requests of LENGTH bytes for
SECONDS, reading no reply; prints how many requests the connection took and exits. A server
without backpressure buffers every reply it makes for such a client.
"""
import os
import socket
import ssl
import struct
import sys
import threading
import time

OPT_MAGIC = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise SystemExit("server closed the connection during negotiation")
        data += chunk
    return data


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    export, length, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ca, cert, key, server_name = sys.argv[5:9]
    raw = socket.create_connection((host, int(port)), timeout=30)
    read_exact(raw, 18)
    raw.sendall(struct.pack(">I", 3))
    raw.sendall(struct.pack(">QII", OPT_MAGIC, 5, 0))
    read_exact(raw, 20)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    conn = context.wrap_socket(raw, server_hostname=server_name)
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    conn.sendall(struct.pack(">QII", OPT_MAGIC, 7, len(data)) + data)
    while True:
        _, _, kind, size = struct.unpack(">QIII", read_exact(conn, 20))
        read_exact(conn, size)
        if kind == 1:
            break
        if kind & 0x80000000:
            raise SystemExit("GO refused")
    sent = [0]

    def flood():
        try:
            while True:
                conn.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, sent[0], 0, length))
                sent[0] += 1
        except OSError:
            pass

    threading.Thread(target=flood, daemon=True).start()
    time.sleep(seconds)
    print(sent[0], flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
