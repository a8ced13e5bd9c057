"""An upstream service for the proxy tests, written in Python with nothing but its standard library.

It knows nothing of idempotency keys: it counts how many times each key's request ran, so that the tests can
prove the proxy let each run once. Started as `python3 upstream.py [PORT]` (0 or none: a free port); it prints
`LISTENING <port>` once it serves.

Routes:
  POST|PATCH|PUT /orders...   runs an "order": counts it under its Idempotency-Key, waits ?delay=MS, answers
                              201 JSON {key, run, total, body, pid} with a Location header
  GET /counts                 JSON {key: runs}
  ANY /echo                   JSON of the request as received: method, path, raw headers, body length
  GET /hop                    a response carrying hop-by-hop headers the proxy must drop
  ANY /status/N               answers N with a JSON body
  GET|POST /big?bytes=N       N bytes, chunked, as application/octet-stream (POST counts a run)
  POST /crash                 counts a run, then closes the connection without answering
  GET|POST /truncate          announces 100 bytes, sends 10, closes (POST counts a run)
"""

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

runs = {}
total = 0
lock = threading.Lock()


def count(key):
    global total
    with lock:
        runs[key] = runs.get(key, 0) + 1
        total += 1
        return runs[key], total


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the body would wait for an ACK.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status, payload, extra=()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self.read_body()
        key = self.headers.get("Idempotency-Key")
        path = url.path

        if path == "/counts":
            with lock:
                return self.send_json(200, dict(runs))
        if path == "/echo":
            return self.send_json(
                200,
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": [[name, value] for name, value in self.headers.items()],
                    "bodyLength": len(body),
                    "body": body.decode("utf-8", "replace") if len(body) < 4096 else None,
                },
            )
        if path == "/hop":
            return self.send_json(
                200,
                {"ok": True},
                [
                    ("Connection", "X-Hop"),
                    ("X-Hop", "for this connection only"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Authenticate", "Basic"),
                    ("Trailer", "X-Checksum"),
                    ("Upgrade", "h2c"),
                    ("X-End-To-End", "kept"),
                    ("Set-Cookie", "a=1"),
                    ("Set-Cookie", "b=2"),
                ],
            )
        if path.startswith("/status/"):
            if self.command in ("POST", "PATCH"):
                count(key)
            return self.send_json(int(path.split("/")[2]), {"status": int(path.split("/")[2])})
        if path == "/big":
            if self.command == "POST":
                count(key)
            size = int(query.get("bytes", ["1048576"])[0])
            self.send_response(200)
            self.send_header("Content-Type", query.get("type", ["application/octet-stream"])[0])
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"x" * 65536
            left = size
            while left > 0:
                piece = block[: min(left, len(block))]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                left -= len(piece)
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/crash":
            count(key)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if path == "/truncate":
            if self.command == "POST":
                count(key)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"partial":')
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if path.startswith("/orders") and self.command in ("POST", "PATCH", "PUT"):
            run, number = count(key)
            delay = int(query.get("delay", ["0"])[0])
            if delay:
                time.sleep(delay / 1000)
            return self.send_json(
                201,
                {
                    "key": key,
                    "run": run,
                    "total": number,
                    "body": body.decode("utf-8", "replace"),
                    "pid": os.getpid(),
                },
                [("Location", "/orders/%d" % number)],
            )
        return self.send_json(404, {"detail": "not found"})

    do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = do_DELETE = handle_any


class Server(ThreadingHTTPServer):
    # Several proxies open many connections at once: the default backlog of 5 would drop their SYNs.
    request_queue_size = 1024
    daemon_threads = True


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = Server(("127.0.0.1", port), Handler)
    print("LISTENING %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
