"""Time from `make demo` to the first streamed reply in the browser, as a new user sees it.

    git clone <repo> /tmp/fresh && rm -rf ~/.cache/pip
    .venv/bin/python benchmarks/demo_startup.py /tmp/fresh "what is the capital of france?" ...

Starts `make demo` in the given clone (install, `rlchat starter ensure`, `rlchat serve`), waits
for the page, then types each question into the chat tab in headless Chromium
(/usr/bin/chromium) and prints when the server answered, when the first reply's text appeared
(seconds from the command) and every exchange. Not a test: it needs a fresh clone to measure
what the issue asks (the install included).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright


def wait_for_server(url: str, proc: subprocess.Popen[bytes]) -> None:
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"make demo exited with {proc.returncode} before serving")
            time.sleep(0.5)


def settled_text(locator, quiet_s: float = 3.0) -> str:  # type: ignore[no-untyped-def]
    """The element's text once it has stopped changing for `quiet_s` (the stream ended)."""
    last, since = None, time.perf_counter()
    while time.perf_counter() - since < quiet_s:
        text = locator.inner_text()
        if text != last:
            last, since = text, time.perf_counter()
        time.sleep(0.25)
    return last or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("clone", type=Path, help="a fresh clone of the repository")
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    start = time.perf_counter()
    with open(args.clone / "demo.log", "wb") as log:
        proc = subprocess.Popen(
            ["make", "demo", f"PORT={args.port}"],
            cwd=args.clone,
            stdout=log,
            stderr=log,
            start_new_session=True,  # so that the server make started stops with it
        )
    try:
        wait_for_server(url, proc)
        print(f"server answering at {time.perf_counter() - start:.1f} s", flush=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium")
            page = browser.new_page()
            page.goto(url)
            for i, question in enumerate(args.questions):
                page.locator("#chat-input textarea").fill(question)
                page.locator("#chat-send").click()
                reply = page.locator("#chat-bot .message").nth(2)  # each message nests twice
                reply.wait_for(timeout=180_000)
                if i == 0:
                    seconds = time.perf_counter() - start
                    print(f"first streamed reply visible at {seconds:.1f} s", flush=True)
                print(f"Q: {question}\nA: {settled_text(reply)}\n", flush=True)
                page.locator("#chat-new").click()
                reply.wait_for(state="detached", timeout=30_000)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
