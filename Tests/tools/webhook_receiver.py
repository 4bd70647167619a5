#!/usr/bin/python3
"""A webhook receiver for the alert tests: answers 500 to the first --fail requests, 200 to
the rest, and appends each request as a JSON line (headers and body) to --log.

    webhook_receiver.py --port-file F --log L [--fail N]
"""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--port-file", required=True)
p.add_argument("--log", required=True)
p.add_argument("--fail", type=int, default=0)
a = p.parse_args()
lock = threading.Lock()
seen = [0]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock:
            seen[0] += 1
            fail = seen[0] <= a.fail
            with open(a.log, "a") as f:
                f.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body.decode(), "answered": 500 if fail else 200}) + "\n")
        self.send_response(500 if fail else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(a.port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os
os.rename(a.port_file + ".tmp", a.port_file)
server.serve_forever()
