"""OpenMined PSI (``openmined-psi==2.0.6``) on two id files; run inside its own virtualenv.

Not part of the product and never imported by it: ``benchmarks/psi.py`` runs this file with the
interpreter of ``benchmarks/.venvs/openmined-psi`` and reads the JSON it prints::

    benchmarks/.venvs/openmined-psi/bin/python benchmarks/_openmined_psi.py LEFT RIGHT [--header]

LEFT is the client's set (it learns the intersection), RIGHT the server's. The protocol runs the
way the library's README shows (server and client ``CreateWithNewKey(reveal_intersection=True)``,
``CreateSetupMessage(fpr, ...)``, ``CreateRequest``, ``ProcessRequest``, ``GetIntersection``), and
every message is serialised and parsed back as it would be on a wire, inside the timed span.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("left")
    parser.add_argument("right")
    parser.add_argument("--fpr", type=float, default=1e-9)
    parser.add_argument("--header", action="store_true", help="skip each file's first line")
    args = parser.parse_args()

    started = time.perf_counter()
    import private_set_intersection.python as psi

    imported = time.perf_counter()
    with open(args.left, encoding="utf-8") as f:
        client_items = f.read().split("\n")
    with open(args.right, encoding="utf-8") as f:
        server_items = f.read().split("\n")
    skip = 1 if args.header else 0
    client_items = [x for x in client_items[skip:] if x]
    server_items = [x for x in server_items[skip:] if x]
    loaded = time.perf_counter()

    server = psi.server.CreateWithNewKey(True)
    client = psi.client.CreateWithNewKey(True)
    setup_bytes = server.CreateSetupMessage(
        args.fpr, len(client_items), server_items
    ).SerializeToString()
    request_bytes = client.CreateRequest(client_items).SerializeToString()
    request = psi.Request()
    request.ParseFromString(request_bytes)
    response_bytes = server.ProcessRequest(request).SerializeToString()
    setup = psi.ServerSetup()
    setup.ParseFromString(setup_bytes)
    response = psi.Response()
    response.ParseFromString(response_bytes)
    intersection = client.GetIntersection(setup, response)
    finished = time.perf_counter()

    print(
        json.dumps(
            {
                "library": "openmined-psi",
                "version": psi.__version__,
                "fpr": args.fpr,
                "left_rows": len(client_items),
                "right_rows": len(server_items),
                "intersection_size": len(intersection),
                "protocol_seconds": round(finished - loaded, 3),
                "import_seconds": round(imported - started, 3),
                "load_seconds": round(loaded - imported, 3),
                "bytes": {
                    "setup": len(setup_bytes),
                    "request": len(request_bytes),
                    "response": len(response_bytes),
                    "total": len(setup_bytes) + len(request_bytes) + len(response_bytes),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
