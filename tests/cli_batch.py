"""Runs several `ecgplat` commands in one process, in order, each as `python -m ecgplat` runs it
(`tests/test_hospital_privacy.py` saves a Python start per command this way): before each, a
marker line on stdout and stderr; stops with the exit status of the first command that fails.

Usage: python tests/cli_batch.py '[["info", "STORE"], ["split", ...]]'
"""

from __future__ import annotations

import json
import sys

MARKER = "\n=== ecgplat command {} ===\n"


def main() -> int:
    from ecgplat.cli import app

    for i, args in enumerate(json.loads(sys.argv[1])):
        for stream in (sys.stdout, sys.stderr):
            stream.write(MARKER.format(i))
            stream.flush()
        try:
            app([str(a) for a in args], prog_name="ecgplat")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if code:
                return code
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
