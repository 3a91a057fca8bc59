#!/usr/bin/env python3
"""A stand-in OTLP/HTTP collector for the otel_export example (scripts/test.sh).

    otlp-sink.py serve FILE    listens on 127.0.0.1 (a free port, printed as
                               "listening on http://127.0.0.1:PORT"), appends the
                               body of every POST /v1/traces to FILE and answers as a
                               collector does (200, an empty protobuf response)
    otlp-sink.py check FILE TRACE_ID NAME...
                               exits 0 when FILE holds the trace id (as the 16 bytes
                               protobuf carries) and every NAME (span names, attribute
                               keys and values are plain strings in protobuf)
"""
import http.server
import sys


def serve(path):
    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            with open(path, "ab") as out:
                out.write(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt, *args):
            sys.stderr.write("otlp-sink: " + (fmt % args) + "\n")

    server = http.server.HTTPServer(("127.0.0.1", 0), Sink)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def check(path, trace_id, names):
    data = open(path, "rb").read()
    missing = [n for n in names if n.encode() not in data]
    if bytes.fromhex(trace_id) not in data:
        missing.insert(0, f"trace {trace_id}")
    if missing:
        print(f"the OTLP export ({len(data)} bytes) lacks: {missing}", file=sys.stderr)
        sys.exit(1)
    print(f"the OTLP export ({len(data)} bytes) holds trace {trace_id} and {len(names)} names")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
