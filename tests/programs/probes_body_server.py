"""HTTP server whose bodies a probe must not read whole. Prints "serving PORT".

Paths (any method):
    /small            200, "ok"
    /endless          200, 64 KiB chunks without end (no Content-Length)
    /big              200, Content-Length 50 MiB, all of it sent
    /events           200, text/event-stream, one event every 50 ms without end
    /endless-503      503, 64 KiB chunks without end
Each request handled is appended to ./requests as "METHOD PATH".
"""

import http.server
import pathlib
import sys
import time

CHUNK = b"x" * 65536
BIG = 50 * 1024 * 1024
here = pathlib.Path.cwd()


class Handler(http.server.BaseHTTPRequestHandler):
    def handle_one(self) -> None:
        with open(here / "requests", "a") as log:
            log.write(f"{self.command} {self.path}\n")
        path = self.path
        try:
            if path == "/small":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            elif path in ("/endless", "/endless-503"):
                self.send_response(200 if path == "/endless" else 503)
                self.end_headers()
                while True:
                    self.wfile.write(CHUNK)
            elif path == "/big":
                self.send_response(200)
                self.send_header("Content-Length", str(BIG))
                self.end_headers()
                for _ in range(BIG // len(CHUNK)):
                    self.wfile.write(CHUNK)
            elif path == "/events":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                while True:
                    self.wfile.write(b"data: tick\n\n")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the probe closed the connection: what it should do

    do_GET = do_PUT = do_POST = handle_one

    def log_message(self, *args: object) -> None:
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(f"serving {server.server_address[1]}", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    sys.exit(0)
