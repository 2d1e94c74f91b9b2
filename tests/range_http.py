"""A loopback HTTP file server with byte ranges (as object stores serve them), for the remote
tests: `python tests/range_http.py DIR SECONDS` serves DIR on 127.0.0.1 at a free port, prints
the port on its first line and stops by itself after SECONDS. (The standard library's
`http.server` ignores Range headers; zarr reads a shard's index as a suffix range.)"""

from __future__ import annotations

import functools
import http.server
import io
import os
import re
import sys
import threading

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet: the tests read stdout for the port only
        pass

    def send_head(self):
        wanted = _RANGE.fullmatch((self.headers.get("Range") or "").strip())
        path = self.translate_path(self.path)
        if wanted is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = wanted.groups()
        if first == "":  # a suffix: the last N bytes
            start, end = max(0, size - int(last or 0)), size - 1
        else:
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
        if start >= size or end < start:
            self.send_error(416)
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


def main(folder: str, seconds: float) -> None:
    handler = functools.partial(RangeHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    print(server.server_address[1], flush=True)
    threading.Timer(seconds, server.shutdown).start()
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
