"""A real S3-compatible HTTP server on loopback for the tests: moto's server (the app ``moto_server``
runs), started as its own process, with a fault layer the tests switch through a JSON file.

    python s3_server.py PORT FAULTS_JSON

Each rule of ``{"rules": [...]}`` applies to requests whose path contains ``contains`` (and whose
method is ``method``, if given):

* ``{"delay_s": N}``: answer N seconds late (a slow store);
* ``{"rewrite_with": [file, file, ...]}``: before answering, overwrite the object being read with
  the next file's bytes, in turn (an uploader rewriting it while it is downloaded).

Only the fault layer is ours; every S3 answer comes from moto's own S3 implementation over HTTP.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def main() -> None:
    port, faults_path = int(sys.argv[1]), sys.argv[2]
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple
    from werkzeug.test import EnvironBuilder

    moto_app = DomainDispatcherApplication(create_backend_app)
    counters: dict[int, int] = {}
    lock = threading.Lock()

    def rules() -> list[dict]:
        try:
            with open(faults_path) as f:
                return json.load(f).get("rules", [])
        except (OSError, ValueError):
            return []

    def app(environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        for i, rule in enumerate(rules()):
            if rule.get("contains", "\0") not in path or rule.get("method", method) != method:
                continue
            if rule.get("delay_s"):
                time.sleep(float(rule["delay_s"]))
            if rule.get("rewrite_with"):
                with lock:
                    n = counters[i] = counters.get(i, -1) + 1
                with open(rule["rewrite_with"][n % len(rule["rewrite_with"])], "rb") as f:
                    body = f.read()
                # moto routes a request to its S3 backend by the credential scope of its Authorization
                # header (signatures are not checked): reuse the client's.
                headers = {"Host": environ["HTTP_HOST"], "Authorization": environ.get("HTTP_AUTHORIZATION", "")}
                put = EnvironBuilder(path=path, method="PUT", data=body, headers=headers)
                moto_app(put.get_environ(), lambda *a, **k: None)
        return moto_app(environ, start_response)

    print(f"s3 test server on 127.0.0.1:{port} (pid {os.getpid()})", flush=True)
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
