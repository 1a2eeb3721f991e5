"""fm demo: progressive sampling (x_t every K steps) and the Gradio app driven over HTTP and in Chromium.

gradio is the `demo` extra; .ci/run installs it (and Chromium + Playwright for the browser test).
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import QuietLog, fm_env
from fmcli.generate import initial_noise, load_for_sampling
from fmcli.solvers import time_grid


@pytest.fixture(scope="module")
def loaded(debug_run):
    return load_for_sampling(str(debug_run), torch.device("cpu"))


def _settings(loaded, **kw):
    return loaded.config.sample.model_copy(update=kw)


def test_frames_are_the_euler_states_every_k_steps(loaded):
    from fmcli.demo import progressive

    n, seed, steps, k, label, w = 3, 5, 6, 2, 1, 2.0
    frames = list(progressive(loaded, n=n, seed=seed, sample_cfg=_settings(loaded, solver="euler", steps=steps, cfg=w), every=k,
                              device=torch.device("cpu"), class_label=label))
    # independent reference: plain Euler with CFG written out here, from the same per-index noise
    x = initial_noise(seed, range(n), loaded.shape)
    y, null = torch.full((n,), label), torch.full((n,), loaded.model.null_class)
    grid = time_grid(steps, loaded.config.flow.shift)
    states = [x]
    with torch.no_grad():
        for i in range(steps):
            t = grid[i].expand(n)
            v_c, v_u = loaded.model(x, t, y=y), loaded.model(x, t, y=null)
            x = x + (grid[i + 1] - grid[i]) * (v_u + w * (v_c - v_u))
            states.append(x)
    assert [f.step for f in frames] == [0, 2, 4, 6] and [f.final for f in frames] == [False, False, False, True]
    for f in frames:
        assert f.t == pytest.approx(float(grid[f.step]))
        torch.testing.assert_close(f.x, states[f.step], atol=1e-5, rtol=1e-5)
    assert frames[-1].nfe == steps


def test_rk4_frames_start_each_step_and_stopping_early_ends_the_worker(loaded):
    from fmcli.demo import progressive

    gen = progressive(loaded, n=2, seed=0, sample_cfg=_settings(loaded, solver="rk4", steps=4, cfg=1.0), every=1, device=torch.device("cpu"))
    first, second = next(gen), next(gen)
    assert (first.step, second.step) == (0, 1)
    torch.testing.assert_close(first.x, initial_noise(0, range(2), loaded.shape))
    gen.close()  # a closed page: the sampler thread must stop, not run on
    import threading

    assert not [t for t in threading.enumerate() if t.name == "fm-demo-sampler"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(str):
    """The demo server's URL, with its process (`proc`) and gradio cache directory (`cache`)."""


@pytest.fixture(scope="module")
def server(debug_run, tmp_path_factory):
    pytest.importorskip("gradio")  # the `demo` extra
    pytest.importorskip("gradio_client")
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    cache = log.parent / "gradio-cache"  # gradio's copies of what the page received (not the machine's /tmp/gradio)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fmcli.cli", "demo", "--ckpt", str(debug_run), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=fm_env({"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(cache)}))
    url = _Server(f"http://127.0.0.1:{port}/")
    url.proc, url.cache = proc, cache
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("fm demo did not start within 60 s:\n" + log.read_text())
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_demo_api_streams_previews_then_the_grid(server, loaded):
    from gradio_client import Client
    from PIL import Image

    client = Client(server, verbose=False)
    job = client.submit("", "triangle", 4, 2.0, 6, "euler", 7, 2, "cfg", 1.0, api_name="/generate")
    image, status, grid = job.result(timeout=60)
    outputs = job.outputs()
    assert [o[1].split(",")[0] for o in outputs[:-1]] == ["step 0/6", "step 2/6", "step 4/6"]  # the progressive view
    assert all(o[2] is None for o in outputs[:-1])
    assert status.startswith("done: 4 image(s), 6 network evaluations (euler, cfg 2)")
    # the downloadable grid is exactly the model's samples for class 'triangle' (index 2), seed 7
    from fmcli.demo import progressive
    from fmcli.images import grid_image

    names = loaded.info["class_names"]
    final = list(progressive(loaded, n=4, seed=7, sample_cfg=_settings(loaded, solver="euler", steps=6, cfg=2.0), every=6,
                             device=torch.device("cpu"), class_label=names.index("triangle")))[-1]
    got = np.asarray(Image.open(grid))
    assert np.array_equal(got, np.asarray(grid_image(final.x)))
    assert Image.open(image).size[0] >= got.shape[1]  # the on-page preview is the upscaled grid


def test_demo_rejects_bad_input_with_a_message(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="less than minimum value 1"):  # the steps slider's bounds hold for API calls too
        client.predict("", "all classes (cycling)", 2, 1.0, 0, "euler", 0, 1, "cfg", 1.0, api_name="/generate")
    with pytest.raises(Exception, match="images must be between 1 and 16|greater than maximum"):
        client.predict("", "all classes (cycling)", 17, 1.0, 4, "euler", 0, 1, "cfg", 1.0, api_name="/generate")
    with pytest.raises(Exception, match="auto needs `fm demo --guide-ckpt`|not in the list of choices"):  # no guide loaded
        client.predict("", "all classes (cycling)", 2, 2.0, 4, "euler", 0, 1, "auto", 1.0, api_name="/generate")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# Outside CI a developer may lack a browser; CI installs one (.ci/run), so there a missing one fails.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs the Debian chromium package (installed by .ci/run)")
def test_demo_in_headless_chromium(server, tmp_path):
    assert CHROMIUM is not None, "chromium not found: .ci/run installs Debian's chromium package"
    if os.environ.get("CI"):
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(server)
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("done: 4 image(s)").wait_for()
            img = page.locator("#fm-output img")
            img.wait_for()
            assert img.evaluate("e => e.complete && e.naturalWidth") > 0
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    from PIL import Image

    assert Image.open(shot).size[0] == 1200


def test_text_model_frames_follow_the_prompt(tmp_path):
    from fmcli.config import apply_overrides, load_config
    from fmcli.data.shapes import prepare_shapes
    from fmcli.demo import progressive
    from fmcli.encoders import build_tiny_text_encoder
    from fmcli.errors import UsageError
    from fmcli.generate import iterate_samples
    from fmcli.train import train

    t5 = build_tiny_text_encoder(tmp_path / "t5", seed=0, words=["a", "red", "blue", "circle", "star"], d_model=16, layers=1, heads=2)
    data = prepare_shapes(tmp_path / "shapes", size=8, count=16, seed=0)
    cfg = apply_overrides(load_config("quickstart-text"), [
        "model.hidden_size=32", "model.depth=1", "model.heads=2", "model.patch_size=4", "train.steps=1", "train.global_batch_size=8",
        "train.precision=fp32", "train.log_every=1", "sample.grid_size=2", "sample.steps=2", "data.num_workers=0", "encoders.max_tokens=6",
        f"data.path={data}", f"encoders.text_encoder={t5}",
    ])  # fmt: skip
    train(cfg, tmp_path / "run", log=QuietLog())
    loaded = load_for_sampling(str(tmp_path / "run"), torch.device("cpu"))
    settings = _settings(loaded, solver="heun", steps=4, cfg=3.0)
    with pytest.raises(UsageError, match="enter a prompt"):
        next(progressive(loaded, n=2, seed=1, sample_cfg=settings, every=1, device=torch.device("cpu"), prompt="  "))
    frames = list(progressive(loaded, n=2, seed=1, sample_cfg=settings, every=2, device=torch.device("cpu"), prompt="a red star"))
    assert [f.step for f in frames] == [0, 2, 4] and frames[-1].nfe == 8  # heun: 2 evaluations per step
    ((_, _, ref),) = list(iterate_samples(loaded, [0, 1], seed=1, sample_cfg=settings, batch_size=2, device=torch.device("cpu"),
                                          prompts=["a red star"] * 2))
    torch.testing.assert_close(frames[-1].x, ref.x)  # the same samples as `fm sample --prompt 'a red star' --seed 1`



@pytest.mark.parametrize("solver,guidance", [("euler-sde", "cfg"), ("ab2", "cfg-zero"), ("dopri5", "cfg")])
def test_frames_of_the_new_solvers_and_guidance_end_in_the_fm_sample_result(loaded, solver, guidance):
    from fmcli.demo import progressive
    from fmcli.generate import iterate_samples

    settings = _settings(loaded, solver=solver, steps=6, cfg=3.0, guidance=guidance, sde_noise=1.0, rtol=1e-3, atol=1e-3)
    frames = list(progressive(loaded, n=3, seed=2, sample_cfg=settings, every=2, device=torch.device("cpu"), class_label=1))
    ((_, _, ref),) = list(iterate_samples(loaded, [0, 1, 2], seed=2, sample_cfg=settings, batch_size=3, device=torch.device("cpu"),
                                          class_label=1))
    torch.testing.assert_close(frames[-1].x, ref.x, rtol=0, atol=0)
    assert frames[-1].final and frames[-1].nfe == ref.nfe and not any(f.final for f in frames[:-1])
    times = [f.t for f in frames]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] == 1.0
    if solver != "dopri5":
        assert [f.step for f in frames] == [0, 2, 4, 6] and frames[-1].total == 6
    if guidance == "cfg-zero":
        assert ref.nfe == 6  # zero-init skips the first of the 6 steps (no evaluation); ab2's Heun start-up adds one


@pytest.mark.parametrize("solver", ["heun", "dopri5"])
def test_preview_lines_give_the_network_evaluations_made_so_far(loaded, solver, monkeypatch):
    """dopri5's preview line read "step 3 evaluations": its accepted-step index called evaluations (each step costs
    6 and more, with its rejected tries). Reference: the network's calls counted by a wrapper at the moment the
    sampler hands each preview over (the frame queue's put), and by hand for Heun (2 a step)."""
    import queue
    import types

    from fmcli import demo

    class Counting:
        def __init__(self, net):
            self.net, self.calls = net, 0

        def __getattr__(self, name):
            return getattr(self.net, name)

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return self.net(*args, **kwargs)

    counted, marks = Counting(loaded.model), []

    class MarkingQueue(queue.Queue):
        def put(self, item, *args, **kwargs):
            if item is not None:
                marks.append(counted.calls)
            super().put(item, *args, **kwargs)

    monkeypatch.setattr(demo, "queue", types.SimpleNamespace(Queue=MarkingQueue))
    import dataclasses

    settings = _settings(loaded, solver=solver, steps=4, cfg=2.0, rtol=1e-3, atol=1e-3)
    frames = list(demo.progressive(dataclasses.replace(loaded, model=counted), n=2, seed=0, sample_cfg=settings, every=1, device=torch.device("cpu")))
    previews = frames[:-1]
    assert [f.nfe for f in previews] == marks and frames[-1].nfe == counted.calls
    if solver == "heun":
        assert marks == [0, 2, 4, 6] and [demo.preview_status(f) for f in previews[:2]] == ["step 0/4, t = 0.000", f"step 1/4, t = {previews[1].t:.3f}"]
    else:
        assert len(previews) >= 2 and marks[1] >= 2 + 6  # the initial step size's 2 evaluations, then 6 a step
        assert [demo.preview_status(f) for f in previews] == [f"step {f.step}, {n} evaluations, t = {f.t:.3f}" for f, n in zip(previews, marks)]


def test_demo_without_gradio_says_how_to_install(debug_run):
    code = "import sys; sys.modules['gradio'] = None; sys.argv = ['fm', 'demo', '--ckpt', sys.argv[1]]; from fmcli.cli import app; app()"
    res = subprocess.run([sys.executable, "-c", code, str(debug_run)], capture_output=True, text=True, timeout=120, env=fm_env())
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: fm demo needs gradio: pip install gradio  (or, in the fm checkout: pip install -e '.[demo]')"]


def test_demo_on_a_port_in_use_names_fm_s_own_option(debug_run):
    """A port another program listens on: one line naming --port, the option an fm user has, not gradio's advice
    for its own API ("setting the GRADIO_SERVER_PORT environment variable or passing the `server_port` parameter
    to `launch()`"); no temporary folder left behind."""
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "fmcli.cli", "demo", "--ckpt", str(debug_run), "--port", str(port), "--device", "cpu"],
                             capture_output=True, text=True, timeout=300, env=fm_env())
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: cannot serve on 127.0.0.1:{port}") and "--port" in lines[0], lines
    assert "GRADIO_SERVER_PORT" not in lines[0] and "launch()" not in lines[0], lines


def test_demo_on_a_host_that_does_not_resolve_says_so_in_one_line(debug_run):
    """A --host that is no name of this machine (a typo: `locahost`): one line naming --host, exit 2. Gradio reported
    it as "Cannot find empty port", and uvicorn logged "ERROR: [Errno -2] ..." as a second line before it."""
    pytest.importorskip("gradio")
    res = subprocess.run([sys.executable, "-m", "fmcli.cli", "demo", "--ckpt", str(debug_run), "--host", "no-such-host.invalid", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300, env=fm_env())
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: --host no-such-host.invalid") and "empty port" not in lines[0], lines


def test_page_settings_are_validated_like_fm_sample(loaded):
    from fmcli.config import sample_settings
    from fmcli.errors import UsageError

    s = sample_settings(loaded.config.sample, cfg=3.5, steps=7, solver="midpoint")
    assert (s.cfg, s.steps, s.solver, s.grid_size) == (3.5, 7, "midpoint", loaded.config.sample.grid_size)
    with pytest.raises(UsageError, match="invalid steps"):
        sample_settings(loaded.config.sample, steps=0)
    with pytest.raises(UsageError, match="invalid solver"):
        sample_settings(loaded.config.sample, solver="leapfrog")


def test_the_page_reports_the_guidance_that_runs(loaded):
    """The status line read the slider's guidance scale; an unconditional model samples unguided (cfg 1, as
    `fm sample` reports), so the page's settings are the ones that run."""
    import dataclasses

    from fmcli.demo import page_settings

    assert page_settings(loaded, 2.5, 6, "euler", "cfg", 1.0).cfg == 2.5
    unconditional = dataclasses.replace(loaded, config=loaded.config.with_section("model", num_classes=0))
    ran = page_settings(unconditional, 2.5, 6, "euler", "cfg", 1.0)
    assert (ran.cfg, ran.steps, ran.solver) == (1.0, 6, "euler")


@pytest.mark.parametrize("sig, code, line", [(2, 130, "error: interrupted"), (15, 143, "error: terminated")])
def test_demo_stopped_by_ctrl_c_or_sigterm_exits_like_every_command(debug_run, tmp_path, sig, code, line):
    """Ctrl-C / SIGTERM end `fm demo` as they end every command: exit 130 / 143 and fm's one line on stderr (gradio's
    own wait swallowed the interrupt and exited 0), and the demo's temporary image folder is removed."""
    import signal

    pytest.importorskip("gradio")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fmcli.cli", "demo", "--ckpt", str(debug_run), "--port", str(port), "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=fm_env({"GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path)}))
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, "fm demo did not start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("fm-demo-")]  # the folder the page's images go to
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, (out, err)
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert out == ""  # stdout carries results only: gradio's "Running on local URL" and "Closing server" are logs (stderr)
    assert "Running on local URL:  http://" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fm-demo-")]


def test_the_demo_leaves_no_files_in_gradio_s_cache(server):
    """Gradio saves every preview frame and grid a page receives into its cache (GRADIO_TEMP_DIR, else /tmp/gradio):
    fm demo kept them there for good (a served page filled the disk; the files stayed after fm demo ended).
    It stops the module's server, so it comes after the other tests that use it."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    status = client.predict("", "all classes (cycling)", 2, 1.0, 2, "euler", 0, 1, "cfg", 1.0, api_name="/generate")[1]
    client.close()  # its heartbeat connection would hold the server's shutdown
    assert status.startswith("done: 2 image(s)")
    assert [p for p in server.cache.rglob("*") if p.is_file()]  # the previews and the grid went through the cache
    server.proc.terminate()  # SIGTERM: fm's exit 143, the server closed on the way
    assert server.proc.wait(timeout=30) == 143  # (the wait the fixture's teardown has otherwise)
    assert [p for p in server.cache.rglob("*") if p.is_file()] == []
