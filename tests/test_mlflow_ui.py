"""MLflow's UI shows the comparison: a real `mlflow server`, a sweep logged through the real tracking path, and a
headless chromium (no GPU, fixed window) that renders the runs table and the sweep run's page.

What this MLflow version renders (3.17, read from `--dump-dom`): metric values in full (`-0.13474286354568743`),
params as `name value` rows, and each run name as a link to its run page. A new browser profile opens MLflow 3's
GenAI layout (Traces, Judges, ...; the runs table headed "Training runs") whatever the experiment's kind tag
says; the links the platform prints carry `?workflowType=machine_learning` (`tracking.UI_LAYOUT`), which opens
the Model training layout, its runs table headed "Runs": the check requires that heading.
Skips without chromium (`apt-get install chromium`); `.ci/run` installs it when it runs as root or with sudo.
"""

from __future__ import annotations

import html
import re
import shutil
import statistics
import subprocess
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from lrt_platform.tracking import UI_LAYOUT
from tests.test_compare import bpb, reported_sweep

WINDOW = (1600, 1000)  # width, height
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless chromium for the MLflow UI check; install it "
                                "with `apt-get update && apt-get install -y chromium` (Debian/Ubuntu)")


def _chromium(browser: str, profile, url: str, *action: str) -> str:
    """One headless render of url (the SPA gets 20 s of virtual time to fetch and draw); returns stdout."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--lang=en-US", f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=20000", *action, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    return proc.stdout


def _screenshot(browser: str, profile, url: str, png) -> None:
    import matplotlib.image

    _chromium(browser, profile, url, f"--screenshot={png}")
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (WINDOW[1], WINDOW[0]), (png, image.shape)
    rgb = np.round(image[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = len(np.unique(rgb, axis=0))
    assert colours > 100, f"{png} looks blank ({colours} distinct colours): nothing rendered at {url}"


def _text(dom: str) -> str:
    """The rendered page's visible text, one space between words."""
    dom = re.sub(r"<(script|style)\b[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def test_mlflow_ui_shows_the_sweep_comparison(mlflow_server, tmp_path, capsys):
    browser = BROWSER
    start = time.time()
    tr, parent = reported_sweep(mlflow_server, "ui")  # as a sweep ends: verdicts, metrics, renders, plots
    capsys.readouterr()
    exp_id, run = tr.experiment_id(), MlflowClient(mlflow_server).get_run(parent)
    delta = statistics.mean(bpb("lrt", "b0", s) - bpb("baseline", "b0", s) for s in (0, 1))
    assert run.data.metrics["delta.b0.lrt"] == pytest.approx(delta) and run.data.params["verdict.b0.lrt"] == "lrt_better"
    runs_url, run_url = tr.ui_url(), f"{mlflow_server}/#/experiments/{exp_id}/runs/{parent}{UI_LAYOUT}"
    assert runs_url == f"{mlflow_server}/#/experiments/{exp_id}/runs?workflowType=machine_learning"  # as printed
    profile, logged = tmp_path / "chromium-profile", time.time()

    # 1. Screenshots: real window-sized images with something drawn on them.
    _screenshot(browser, profile, runs_url, tmp_path / "runs.png")
    _screenshot(browser, profile, run_url, tmp_path / "sweep_run.png")

    # 2. The sweep run's page shows the comparison: the delta, the verdict param, its trial runs.
    dom = _chromium(browser, profile, run_url, "--dump-dom")
    text = _text(dom)
    assert run.info.run_name in text, f"the run page did not render (text: {text[:500]!r})"
    shown = re.search(r"(?<![\w.])delta\.b0\.lrt\s+(-?\d[\d.]*(?:e[-+]?\d+)?)", text)
    assert shown, f"no delta.b0.lrt value on the run page (text: {text[:3000]!r})"
    assert float(shown.group(1)) == pytest.approx(delta, rel=1e-3), (shown.group(1), delta)  # 4 significant digits
    assert re.search(r"(?<![\w.])verdict\.b0\.lrt\s+lrt_better\b", text), f"no verdict param (text: {text[:3000]!r})"
    for seed in (0, 1):
        for arm in ("baseline", "lrt"):
            assert f"{arm}-b0-seed{seed}" in text  # the child runs, linked from the sweep run

    # 3. The link a sweep prints opens the runs table (not a GenAI page), listing the sweep run by name.
    dom = _chromium(browser, profile, runs_url, "--dump-dom")
    headings = [_text(h).strip() for h in re.findall(r"<h2\b[^>]*>(.*?)</h2>", dom, flags=re.S)]
    assert "Runs" in headings, f"not the model-training runs table: page headings {headings}"
    row = re.search(rf'href="#/experiments/{exp_id}/runs/{parent}(?:\?[^"]*)?"[^>]*>(?:\s*<[^>]+>)*\s*([^<]+)', dom)
    assert row and row.group(1).strip() == run.info.run_name, f"the runs table does not list {run.info.run_name}"
    print(f"UI check: logging {logged - start:.1f} s, chromium {time.time() - logged:.1f} s; PNGs in {tmp_path}")
