"""Example web service: GET /health -> 200, PUT /api/sync -> 204, GET / -> hello."""

import argparse
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, b"ok\n")
        else:
            self._reply(200, b"hello from hostvisor's example web service\n")

    def do_PUT(self) -> None:
        if self.path == "/api/sync":
            print("sync requested", flush=True)
            self._reply(204)
        else:
            self._reply(404)

    def log_message(self, fmt: str, *args: object) -> None:
        print(fmt % args, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
