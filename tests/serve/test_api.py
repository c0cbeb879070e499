"""The HTTP API through a real client: requests sent together share one sampler call and give sample.py's images,
every bad input is a 4xx naming its field, and a client that leaves frees its place in the queue."""
import base64
import concurrent.futures
import io
import json
import time

import httpx
import numpy as np
from PIL import Image

from dalle_jax.inference import sample
from tests.serve.server import MAX_PROMPT_CHARS, MAX_QUEUED_IMAGES, server  # noqa: F401
from tests.test_sample_cli import run_cli

PROMPT = "a small red circle in the top left"
SETTINGS = dict(temperature=1.2, top_k=16, top_p=0.95, cond_scale=3.0)


def pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))))


def health(server) -> dict:  # noqa: F811
    return httpx.get(f"{server['url']}/health").json()


def post(server, body, **kwargs) -> httpx.Response:  # noqa: F811
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server['url']}/api/samples", content=content, timeout=kwargs.pop("timeout", 120), **kwargs)


def test_health_names_the_run_and_its_compiled_sampler(server):  # noqa: F811
    reply = health(server)
    assert reply["workdir"] == server["workdir"] and reply["step"] > 0 and reply["compiled"] is True
    assert reply["queued_requests"] == 0 and reply["status"] == "ok"


def test_requests_sent_together_share_one_sampler_call_and_match_sample_py(server, tmp_path):  # noqa: F811
    requests = [dict(prompts=[PROMPT], num_images=2, seed=7, **SETTINGS),
                dict(prompts=["a blue square", "a green triangle above a purple circle"], num_images=1, seed=3,
                     **SETTINGS),
                dict(prompts=[PROMPT], num_images=2, seed=7, **SETTINGS)]
    calls = health(server)["sampler_calls"]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda body: post(server, body), requests))
    assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
    assert health(server)["sampler_calls"] == calls + 1  # 6 images fit one call of 8
    replies = [r.json() for r in replies]
    # The same request gives the same images, whatever else shares its call; sample.py gives them too (each of its
    # calls samples 2 images, in one batch of 2).
    assert [i["png"] for i in replies[0]["images"]] == [i["png"] for i in replies[2]["images"]]
    for n, (body, reply) in enumerate(zip(requests[:2], replies)):
        out = tmp_path / str(n)
        flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
        run_cli(f"--workdir={server['workdir']}", f"--prompt={body['prompts'][0]}" if len(body["prompts"]) == 1
                else f"--prompts_file={_prompts_file(tmp_path, body['prompts'])}", f"--num_images={body['num_images']}",
                f"--seed={body['seed']}", f"--out_dir={out}", *flags)
        with open(out / sample.SAMPLES_FILE) as f:
            expected = [json.loads(line) for line in f]
        assert len(reply["images"]) == len(expected)
        for image, record in zip(reply["images"], expected):
            np.testing.assert_array_equal(pixels(image["png"]), np.asarray(Image.open(out / record["file"])))
            got = dict(image["record"])
            np.testing.assert_allclose(got.pop("score"), record.pop("score"), rtol=1e-5)
            assert got == record


def _prompts_file(tmp_path, prompts):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server):  # noqa: F811
    cases = [("", 400, "body"), ("{not json", 400, "body"), ("[1, 2]", 400, "body"),
             (dict(prompts=[PROMPT], colour="red"), 422, "colour"),
             (dict(num_images=1), 422, "prompts"), (dict(prompts=[]), 422, "prompts"),
             (dict(prompts=[PROMPT], temperature=0), 422, "temperature"),
             (dict(prompts=[PROMPT], top_p=1.5), 422, "top_p"),
             (dict(prompts=[PROMPT], top_k=-1), 422, "top_k"),
             (dict(prompts=[PROMPT], cond_scale="high"), 422, "cond_scale"),
             (dict(prompts=[PROMPT], candidates=0), 422, "candidates"),
             (dict(prompts=[PROMPT], seed=2 ** 32), 422, "seed"),
             (dict(prompts=[PROMPT], num_images=MAX_QUEUED_IMAGES + 1), 422, "num_images"),
             (dict(prompts=[PROMPT] * 3, num_images=3), 422, "num_images"),
             (dict(prompts=["x" * (MAX_PROMPT_CHARS + 1)]), 422, "prompts")]
    for body, status, field in cases:
        reply = post(server, body)
        assert (reply.status_code, reply.json()["error"]["field"]) == (status, field), (body, reply.text)
        assert field in reply.json()["error"]["message"] or status == 400
    assert health(server)["queued_requests"] == 0
    assert len(post(server, dict(prompts=[PROMPT], num_images=1)).json()["images"]) == 1


def test_a_client_that_leaves_frees_its_place_in_the_queue(server):  # noqa: F811
    before = health(server)
    leaving = concurrent.futures.ThreadPoolExecutor(1).submit(
        post, server, dict(prompts=[PROMPT], num_images=MAX_QUEUED_IMAGES, seed=11), timeout=0.5)
    _wait_for(lambda: health(server)["queued_images"] == MAX_QUEUED_IMAGES)
    busy = post(server, dict(prompts=[PROMPT], num_images=1))
    assert busy.status_code == 503 and "queued" in busy.json()["error"]["message"]
    try:
        leaving.result()
        raise AssertionError("the leaving client got a reply")
    except httpx.ReadTimeout:
        pass
    _wait_for(lambda: health(server)["queued_images"] == 0)
    reply = post(server, dict(prompts=[PROMPT], num_images=MAX_QUEUED_IMAGES, seed=12))
    assert reply.status_code == 200 and len(reply.json()["images"]) == MAX_QUEUED_IMAGES
    after = health(server)
    # Only the second full request was sampled; the first never reached the sampler.
    assert after["sampler_calls"] == before["sampler_calls"] + 1
    assert after["cancelled"] == before["cancelled"] + 1


def _wait_for(condition, seconds: float = 0.9):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
