#!/usr/bin/env python3
"""Speaks Ferry's framed TLS protocol as a scripted peer, one step at a time.

    frame_session.py HOST:PORT CA CERT KEY SERVER_NAME FILE...

Sends each FILE's bytes (whole frames, as the test made them); after every file but the last it
waits for one frame from the controller before sending the next (the welcome raises the frame
cap, for example). Then reads until the controller closes, and writes every frame received,
as received, to stdout. Exits after 60 s at the most.
"""
import socket
import ssl
import struct
import sys


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    ca, cert, key, server_name = sys.argv[2:6]
    files = sys.argv[6:]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    out = sys.stdout.buffer
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as conn:
            for i, name in enumerate(files):
                with open(name, "rb") as f:
                    conn.sendall(f.read())
                if i < len(files) - 1:
                    header = read_exact(conn, 4)
                    if header is None:
                        break
                    body = read_exact(conn, struct.unpack(">I", header)[0])
                    out.write(header + (body or b""))
            try:
                while True:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
            except (ssl.SSLError, OSError):
                pass
    out.flush()


if __name__ == "__main__":
    main()
