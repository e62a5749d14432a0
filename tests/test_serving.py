"""Stock ``mlx_lm.server`` serving a converted regla folder: concurrent greedy requests of
different lengths (batched by mlx-lm's BatchGenerator) each get the answer they get alone."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "regla" / "default_model"
PROMPTS = ["In the beginning", "And God said, Let there be light: and there was light. And God saw the light",
           "def", "The Python tutorial explains how to define a function with the def keyword and how",
           "Jesus wept.", "import os\nimport sys\n\ndef main(argv):\n    path = os.path.join(", "Lord"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, prompt, max_tokens=20):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    for attempt in range(5):
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["choices"][0]["text"]
        except (ConnectionResetError, ConnectionRefusedError):
            # mlx_lm.server's HTTP server keeps a listen backlog of 5: a burst of connections
            # can be reset before any request is read; the request itself never ran
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError("mlx_lm.server kept resetting the connection")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from regla.convert import convert

    folder = convert(DEFAULT_MODEL, tmp_path_factory.mktemp("srv") / "mlx", log=lambda *_: None)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", str(folder), "--trust-remote-code",
                                 "--host", "127.0.0.1", "--port", str(port), "--decode-concurrency", "8",
                                 "--prompt-concurrency", "8"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("mlx_lm.server did not start:\n" + log.read_text()[-3000:])
                time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_concurrent_requests_get_their_own_answers(server):
    alone = [post(server, p) for p in PROMPTS]
    assert all(alone) and len(set(alone)) > 1
    # every prompt twice, all in flight together: the server batches them
    jobs = PROMPTS * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda p: post(server, p), jobs))
    assert together == alone * 2
