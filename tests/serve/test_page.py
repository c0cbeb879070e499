"""The page at / in a real headless browser (Debian's chromium, driven by Playwright): a prompt typed in gives the
API's images for that seed, and the page shows how to reproduce them with sample.py."""
import shutil

import httpx
import pytest
from playwright.sync_api import sync_playwright

from tests.serve.server import MAX_PROMPT_CHARS, server  # noqa: F401

PROMPT = "a green triangle above a purple circle"


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is missing: `make install` installs it (apt-get install chromium)."
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


def test_the_page_shows_the_apis_images_for_the_prompt_and_seed(server, browser):  # noqa: F811
    page = browser.new_page()
    page.goto(server["url"] + "/")
    page.get_by_text("Ready.").wait_for()
    page.fill("#prompt", PROMPT)
    page.fill("#num_images", "3")
    page.fill("#seed", "5")
    page.click("#generate")
    page.locator("img.sample").nth(2).wait_for(timeout=60_000)
    shown = [page.locator("img.sample").nth(i).get_attribute("src") for i in range(3)]
    downloads = [page.locator("figure a").nth(i).get_attribute("download") for i in range(3)]
    status, command = page.inner_text("#status"), page.inner_text("#command")

    # The page sent the run's default settings; the API fills in the same ones when they are left out.
    reply = httpx.post(f"{server['url']}/api/samples", json=dict(prompts=[PROMPT], num_images=3, seed=5),
                       timeout=120).json()
    assert shown == ["data:image/png;base64," + image["png"] for image in reply["images"]]
    assert downloads == ["00000.png", "00001.png", "00002.png"]
    assert status == "Done: 3 images, seed 5."
    record = reply["images"][0]["record"]
    for part in (f"--workdir '{server['workdir']}'", f"--step {record['step']}", f"--prompt '{PROMPT}'",
                 "--num_images 3", "--seed 5", f"--temperature {record['temperature']}",
                 f"--top_k {record['top_k'] or 0}", f"--cond_scale {record['cond_scale']:g}"):
        assert part in command
    page.close()


def test_a_refused_request_is_shown_on_the_page(server, browser):  # noqa: F811
    page = browser.new_page()
    page.goto(server["url"] + "/")
    page.get_by_text("Ready.").wait_for()
    page.fill("#prompt", "x" * (MAX_PROMPT_CHARS + 1))
    page.click("#generate")
    page.locator("#status.error").wait_for()
    assert page.inner_text("#status").startswith(f"prompts: prompts[0] has {MAX_PROMPT_CHARS + 1} characters")
    page.close()
