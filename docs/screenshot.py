"""Screenshot a pre-annotated task of a running `camlabel demo` in headless Chromium.

    .venv/bin/camlabel demo &                      # wait for "camlabel demo is ready"
    .venv/bin/python docs/screenshot.py            # reads runs/demo/demo.json -> docs/demo.png

Logs in to Label Studio with requests, hands the session cookie to Chromium and drives it over
the Chrome DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out, messages
end with NUL), so it needs no extra package and no browser download: just a `chromium` binary
(Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.local_label_studio import login_session  # noqa: E402


class Chromium:
    """A headless Chromium and its DevTools protocol over a pipe."""

    def __init__(self, binary: str, width: int, height: int) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="camlabel-chromium-")
        to_chrome_r, self._out = os.pipe()
        self._in, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: fd 3 = its commands, fd 4 = its answers
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-dev-shm-usage", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}",
             "about:blank"],
            preexec_fn=fds, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:  # skip events until our answer
            answer = self._read()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._out)
        os.close(self._in)
        self.profile.cleanup()


# Ready when the image is on the canvas and the prediction's region is listed.
READY = """(() => {
  const img = document.querySelector('img[alt="LS"], .lsf-image img, img.lsf-image');
  const canvases = document.querySelectorAll('canvas');
  const regions = document.querySelectorAll('[class*="region-item"], [class*="outliner-item"]');
  return canvases.length > 0 && (!img || img.complete) && regions.length > 0;
})()"""


# Hide the regions of the given labels (the eye icon of each), through the labeling UI's store.
HIDE = """(labels => {
  const regions = window.Htx.annotationStore.selected.regionStore.regions;
  let hidden = 0;
  for (const r of regions) if (labels.includes(r.labelName) && !r.hidden) { r.toggleHidden(); hidden++; }
  return hidden;
})(%s)"""


def screenshot(
    info: dict,
    out: Path,
    binary: str,
    width: int,
    height: int,
    wait: float,
    hide: list[str] = (),
) -> None:
    session = login_session(info["label_studio"], info["email"], info["password"])
    cookies = [
        {"name": c.name, "value": c.value, "url": info["label_studio"]} for c in session.cookies
    ]
    chrome = Chromium(binary, width, height)
    try:
        chrome.send("Storage.setCookies", {"cookies": cookies})
        page = next(
            t["targetId"] for t in chrome.send("Target.getTargets")["targetInfos"]
            if t["type"] == "page"
        )  # fmt: skip
        attached = chrome.send("Target.attachToTarget", {"targetId": page, "flatten": True})
        sid = attached["sessionId"]
        chrome.send("Page.enable", session=sid)
        chrome.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=sid,
        )
        chrome.send("Page.navigate", {"url": info["task_url"]}, session=sid)
        deadline = time.time() + wait
        ready = False
        while time.time() < deadline and not ready:
            time.sleep(1)
            value = chrome.send(
                "Runtime.evaluate", {"expression": READY, "returnByValue": True}, session=sid
            )
            ready = bool(value.get("result", {}).get("value"))
        if not ready:
            print(f"the labeling UI did not look ready within {wait:.0f} s; taking it anyway")
        if hide:
            hidden = chrome.send(
                "Runtime.evaluate",
                {"expression": HIDE % json.dumps(list(hide)), "returnByValue": True},
                session=sid,
            )
            print(f"hid {hidden.get('result', {}).get('value')} regions labelled {', '.join(hide)}")
        time.sleep(3)  # let the brush layer and fonts settle
        shot = chrome.send("Page.captureScreenshot", {"format": "png"}, session=sid)
    finally:
        chrome.close()
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {image.width}x{image.height}, {out.stat().st_size // 1024} KB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo/demo.json", help="written by `camlabel demo`")
    p.add_argument("--out", default="docs/demo.png")
    p.add_argument("--chromium", default="chromium")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=860)
    p.add_argument("--wait", type=float, default=60, help="seconds for the page to load")
    p.add_argument("--task", type=int, default=None, help="another task id of the project")
    p.add_argument(
        "--hide",
        default="",
        help="labels whose regions are hidden, comma-separated (e.g. the mask, to see the "
        "explanation layers under it)",
    )
    args = p.parse_args()
    info = json.loads(Path(args.demo).read_text())
    if args.task:
        info["task_url"] = f"{info['project_url']}?task={args.task}"
    hide = [label for label in args.hide.split(",") if label]
    screenshot(info, Path(args.out), args.chromium, args.width, args.height, args.wait, hide)
    return 0


if __name__ == "__main__":
    sys.exit(main())
