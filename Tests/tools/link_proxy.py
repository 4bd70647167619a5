#!/usr/bin/env python3
"""A TCP relay standing in for the network between two sites in tests.

    link_proxy.py LISTEN_HOST UPSTREAM_HOST:PORT

Prints the port it listens on (bound to port 0), then relays every connection to the
upstream. The test freezes the link with SIGSTOP (bytes wait in the kernel's buffers: no reset,
no close, as when a route goes away) and thaws it with SIGCONT. One process, so a stop freezes
every connection at once. Ends with its parent's SIGTERM.
"""
import socket
import sys
import threading


def pump(src, dst):
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    listen_host = sys.argv[1]
    up_host, up_port = sys.argv[2].rsplit(":", 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((listen_host, 0))
    server.listen(64)
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection((up_host, int(up_port)), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


if __name__ == "__main__":
    main()
