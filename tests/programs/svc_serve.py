"""Test service: HTTP on --port. /health is 200, or 503 while ./unhealthy exists, or never
answers while ./hang exists. PUT /sync appends a line to ./syncs. Writes its env to ./env.json."""

import argparse
import http.server
import json
import os
import pathlib
import time

here = pathlib.Path.cwd()


class Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        if (here / "hang").exists():
            time.sleep(3600)
        self._reply(503 if (here / "unhealthy").exists() else 200)

    def do_PUT(self) -> None:
        with open(here / "syncs", "a") as f:
            f.write(f"{self.command} {self.path}\n")
        self._reply(204)

    def log_message(self, *args: object) -> None:
        pass


parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()
(here / "env.json").write_text(json.dumps(dict(os.environ)))
server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
server.daemon_threads = True
print(f"serving on {args.port}", flush=True)
server.serve_forever()
