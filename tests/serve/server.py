"""A `python -m dalle_jax.serve` process on the session's tiny sampling run, started once per test worker for the
tests of the API and of the page (one unit of work in tests/conftest.py)."""
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO, subprocess_env
from tests.inference import test_text_to_image

# Long enough that requests sent together meet in the queue, and that a client can leave before its batch starts.
MAX_WAIT_MS = 1000
BATCH_SIZE = 8
MAX_QUEUED_IMAGES = 6  # under BATCH_SIZE: a full queue does not fill a sampler call, so it waits
MAX_PROMPT_CHARS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory, shapes_data_dir, compilation_cache):
    # The session's tiny sampling run (`sampling_workdir`, which is module-scoped: this fixture outlives modules).
    sampling_workdir = test_text_to_image.sampling_workdir.__wrapped__(tmp_path_factory, shapes_data_dir,
                                                                       compilation_cache)
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dalle_jax.serve", f"--workdir={sampling_workdir['workdir']}", f"--port={port}",
             f"--batch_size={BATCH_SIZE}", f"--max_wait_ms={MAX_WAIT_MS}", f"--max_images={MAX_QUEUED_IMAGES}",
             f"--max_queued_images={MAX_QUEUED_IMAGES}", f"--max_prompt_chars={MAX_PROMPT_CHARS}"],
            cwd=REPO, env=subprocess_env(compilation_cache), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not compile in time:\n{log.read_text()[-3000:]}"
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                if health["compiled"]:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield dict(url=url, workdir=sampling_workdir["workdir"], health=health)
    finally:
        process.terminate()
        process.wait(timeout=30)
