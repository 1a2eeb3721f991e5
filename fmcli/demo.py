"""`fm demo`: a Gradio page that shows samples forming step by step (gradio is the `demo` extra).

The sampling itself is fm's own (generate.iterate_samples with the checkpoint's solver, guidance and
noise per seed/index, so a demo image equals `fm sample` with the same settings). The solver's on_step
callback hands x_t of every K-th step over; the solver runs in a worker thread and `progressive` yields
those grids while it integrates.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import sample_settings
from .errors import UsageError
from .generate import LoadedModel, class_names_of, decode, guidance_that_runs, iterate_samples
from .images import grid_image, save_image_atomic
from .seeding import seed_problem
from .solvers import ADAPTIVE_SOLVERS, GUIDANCES, MEAN_FLOW_GUIDANCES, MEAN_FLOW_SOLVERS, SOLVERS, Step

INSTALL_HINT = "pip install gradio  (or, in the fm checkout: pip install -e '.[demo]')"
ALL_CLASSES = "all classes (cycling)"


@dataclass
class Frame:
    step: int  # solver steps done (dopri5: accepted steps)
    total: int  # steps of the run (dopri5: 0, unknown in advance)
    t: float  # flow time of x, 0 = noise, 1 = data
    x: torch.Tensor  # [n, C, H, W] images in [-1, 1] (latents decoded) on the CPU
    final: bool = False
    nfe: int = 0  # network evaluations so far (solvers.Step.nfe; the final frame's: the whole solve's)


class _Cancelled(Exception):
    pass


def progressive(
    loaded: LoadedModel,
    *,
    n: int,
    seed: int,
    sample_cfg,
    every: int,
    device: torch.device,
    prompt: str | None = None,
    class_label: int | None = None,
    max_nfe: int | None = None,
) -> Iterator[Frame]:
    """Yield x_t frames every `every` solver steps (the first is the noise), then the final samples.
    `max_nfe`: an adaptive solver that needs more network evaluations stops with a one-line error."""
    if every < 1:
        raise UsageError("preview interval must be >= 1 step")
    if loaded.is_text and not (prompt and prompt.strip()):
        raise UsageError("this is a text-to-image model: enter a prompt")
    prompts = [prompt.strip()] * n if loaded.is_text else None
    frames: queue.Queue = queue.Queue()
    stop = threading.Event()
    outcome: dict = {"steps": 0}

    def on_step(step: Step):
        if stop.is_set():  # the consumer went away: end the solve at this step
            raise _Cancelled()
        if max_nfe is not None and step.nfe > max_nfe:
            raise UsageError(f"{sample_cfg.solver} needed more than {max_nfe} network evaluations and was stopped; "
                             "lower the guidance scale or pick a fixed-step solver")
        outcome["steps"] = step.index
        if step.index % every == 0 and step.t < 1.0:  # the final state comes as the final frame
            frames.put((step.index, step.total, step.t, step.x.detach().clone(), step.nfe))

    def work():
        try:
            ((_, _, result),) = list(
                iterate_samples(
                    loaded, list(range(n)), seed=seed, sample_cfg=sample_cfg, batch_size=n, device=device,
                    class_label=None if loaded.is_text else class_label, prompts=prompts, on_step=on_step,
                )
            )
            outcome["result"] = result
        except BaseException as err:  # reported in the generator's thread
            outcome["error"] = err
        finally:
            frames.put(None)

    worker = threading.Thread(target=work, name="fm-demo-sampler", daemon=True)
    worker.start()
    total = 0 if sample_cfg.solver in ADAPTIVE_SOLVERS else sample_cfg.steps
    try:
        while True:
            item = frames.get()
            if item is None:
                break
            step, total, t, x, nfe = item
            yield Frame(step=step, total=total, t=t, x=decode(loaded, x).cpu() if loaded.vae is not None else x.cpu(), nfe=nfe)
    finally:
        stop.set()  # the consumer went away (closed page): the worker stops at its next evaluation
        worker.join()
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, _Cancelled):
            return
        raise err
    result = outcome["result"]
    yield Frame(step=outcome["steps"], total=total, t=1.0, x=result.x.cpu(), final=True, nfe=result.nfe)


def preview_status(frame: Frame) -> str:
    """The page's line under a preview: "step 2/6, t = 0.333"; an adaptive solver's steps are not known in
    advance, so its line gives the step and the network evaluations so far: "step 2, 14 evaluations, t = 0.412"."""
    of = f"/{frame.total}" if frame.total else f", {frame.nfe} evaluations"
    return f"step {frame.step}{of}, t = {frame.t:.3f}"


MAX_STEPS, MAX_EVERY = 250, 50  # the page's slider ranges, enforced again by the handler
MAX_CFG, MAX_SDE_NOISE = 10.0, 4.0  # the guidance and SDE-noise sliders' upper ends (both start at 0)
# dopri5 picks its own steps, so the steps slider does not bound it: a stiff request (a huge guidance scale)
# once took 464 evaluations. It stops at what the steps slider allows Heun (2 evaluations a step).
MAX_DOPRI5_NFE = 2 * MAX_STEPS
CACHE_CLEANUP = (600, 3600)  # gradio's delete_cache: every 600 s, its cached files older than 3600 s (all at close)


def bounded_request(images, steps, every, max_images: int) -> tuple[int, int, int]:
    """The page's numbers clamped to the sliders' ranges: a client calling /generate directly cannot ask
    for a million steps or images (the sliders bound only the browser)."""
    return (int(_clamp(images, 1, max_images, "images")), int(_clamp(steps, 1, MAX_STEPS, "steps")),
            int(_clamp(every, 1, MAX_EVERY, "every")))


def bounded_sampling(cfg_scale, sde_noise, seed) -> tuple[float, float, int]:
    """The guidance scale and SDE noise clamped to their sliders' ranges, like `bounded_request`: the server never
    runs what the page could not ask for. A seed outside [0, 2**32) is refused, not clamped: it would repeat
    another seed's images (fmcli.seeding)."""
    exact = isinstance(seed, int) and not isinstance(seed, bool)  # an int seed keeps all its digits (a float has 53 bits)
    seed = seed if exact else _clamp(seed, -math.inf, math.inf, "seed")
    if problem := seed_problem(seed):
        raise UsageError(problem)
    seed = int(seed)
    return _clamp(cfg_scale, 0.0, MAX_CFG, "guidance scale"), _clamp(sde_noise, 0.0, MAX_SDE_NOISE, "SDE noise"), seed


def page_settings(loaded: LoadedModel, cfg_scale, steps: int, solver, guidance, sde_noise):
    """The sampling settings a page request runs with: validated like `fm sample`'s flags, and guidance as it
    runs on this model (an unconditional model samples unguided: cfg 1), so the status line reports what ran."""
    settings = sample_settings(loaded.config.sample, cfg=cfg_scale, steps=steps, solver=str(solver), guidance=str(guidance), sde_noise=sde_noise)
    return guidance_that_runs(loaded, settings)


def _clamp(value, lo: float, hi: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"{what} must be a number, got {value!r}") from None
    if number != number:  # NaN
        raise UsageError(f"{what} must be a number, got {value!r}")
    return min(max(number, lo), hi)


def _display(x: torch.Tensor, min_side: int = 384):
    """A grid image upscaled (nearest) so small samples are visible in the page."""
    from PIL import Image

    img = grid_image(x)
    scale = max(1, min_side // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def _import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio as gr
    except ImportError:
        raise UsageError(f"fm demo needs gradio: {INSTALL_HINT}") from None
    return gr


def build_app(loaded: LoadedModel, device: torch.device, out_dir: Path, max_images: int = 16):
    """The Gradio Blocks app; its API endpoint is /generate (prompt, class, images, cfg, steps, solver, seed, every,
    guidance, sde_noise). Autoguidance ("auto") is offered when the model was loaded with a guide."""
    gr = _import_gradio()
    cfg = loaded.config
    class_names = class_names_of(loaded) if loaded.num_classes else []
    kind = "text-to-image" if loaded.is_text else ("class-conditional" if class_names else "unconditional")

    guidances = [g for g in GUIDANCES if g != "auto" or loaded.guide is not None]
    mean_flow = cfg.flow.objective == "meanflow"  # only its own jumps and cfg fit an average-velocity model
    solvers = [s for s in SOLVERS if (s in MEAN_FLOW_SOLVERS) == mean_flow]
    guidances = [g for g in guidances if g in MEAN_FLOW_GUIDANCES or not mean_flow]

    def generate(prompt, class_choice, images, cfg_scale, steps, solver, seed, every, guidance="cfg", sde_noise=1.0):
        try:
            n, steps, every = bounded_request(images, steps, every, max_images)
            cfg_scale, sde_noise, seed = bounded_sampling(cfg_scale, sde_noise, seed)
            if guidance not in guidances:
                raise UsageError(f"guidance {guidance!r} is not available here; choose one of {', '.join(guidances)}"
                                 + ("" if loaded.guide is not None else " (auto needs `fm demo --guide-ckpt`)"))
            sample_cfg = page_settings(loaded, cfg_scale, steps, solver, guidance, sde_noise)
            label = None
            if class_names and class_choice not in (None, "", ALL_CLASSES):
                if class_choice not in class_names:
                    raise UsageError(f"unknown class {class_choice!r}")
                label = class_names.index(class_choice)
            frames = progressive(
                loaded, n=n, seed=seed, sample_cfg=sample_cfg, every=every, device=device,
                prompt=prompt, class_label=label, max_nfe=MAX_DOPRI5_NFE if sample_cfg.solver in ADAPTIVE_SOLVERS else None,
            )
            for frame in frames:
                if not frame.final:
                    yield _display(frame.x), preview_status(frame), None
                    continue
                path = save_image_atomic(grid_image(frame.x), out_dir / f"fm-{kind.split('-')[0]}-seed{int(seed)}-{os.urandom(3).hex()}.png")
                yield _display(frame.x), f"done: {n} image(s), {frame.nfe} network evaluations ({solver}, {guidance} {sample_cfg.cfg:g})", str(path)
        except UsageError as err:
            raise gr.Error(str(err)) from None

    # Gradio copies every preview frame and grid into its cache (GRADIO_TEMP_DIR, else /tmp/gradio) and, unless told,
    # keeps them for good: a served page would fill the disk. Files older than an hour go every 10 minutes, all at close.
    with gr.Blocks(title="fm demo", delete_cache=CACHE_CLEANUP) as app:
        gr.Markdown(f"### fm demo: {kind} model, step {loaded.step}, {'x'.join(map(str, loaded.shape[1:]))} px\nThe preview shows x_t as the ODE integrates from noise (t = 0) to data (t = 1).")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a photo of ...", visible=loaded.is_text)
                choice = gr.Dropdown([ALL_CLASSES] + class_names, value=ALL_CLASSES, label="Class", visible=bool(class_names))
                images = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Images")
                cfg_scale = gr.Slider(0.0, MAX_CFG, value=min(cfg.sample.cfg, MAX_CFG), step=0.1, label="Guidance scale (1 = off)")
                guidance = gr.Dropdown(guidances, value=cfg.sample.guidance if cfg.sample.guidance in guidances else "cfg", label="Guidance")
                steps = gr.Slider(1, MAX_STEPS, value=min(cfg.sample.steps, MAX_STEPS), step=1, label="Steps")
                solver = gr.Dropdown(solvers, value=cfg.sample.solver, label="Solver")
                sde_noise = gr.Slider(0.0, MAX_SDE_NOISE, value=min(cfg.sample.sde_noise, MAX_SDE_NOISE), step=0.1, label="SDE noise (euler-sde)")
                seed = gr.Number(value=0, precision=0, label="Seed")
                every = gr.Slider(1, MAX_EVERY, value=min(MAX_EVERY, max(1, cfg.sample.steps // 10)), step=1, label="Preview every K steps")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="samples", type="pil", format="png", elem_id="fm-output")
                status = gr.Markdown(elem_id="fm-status")
                grid_file = gr.File(label="grid (PNG, full resolution)")
        inputs = [prompt, choice, images, cfg_scale, steps, solver, seed, every, guidance, sde_noise]
        button.click(generate, inputs, [image, status, grid_file], api_name="generate")
    app.queue(default_concurrency_limit=1)  # one model, one generation at a time
    return app


def launch_demo(
    ckpt: str, *, host: str, port: int, share: bool, device: torch.device, vae=None, text_encoder=None, max_images: int = 16, guide_ckpt=None,
    precision: str | None = None, compile_model: bool | None = None, log=lambda message: None,
) -> None:
    """Serve the demo. The network runs at sample.precision / sample.compile (or `precision` / `compile_model`),
    resolved once at launch; a compiled network is reused by every request."""
    _import_gradio()  # fail fast, before loading the model
    check_address(host, port)
    from .generate import load_for_sampling, prepare_for_sampling, with_guide

    loaded = load_for_sampling(ckpt, device, vae=vae, text_encoder=text_encoder, vae_option="--vae")
    if guide_ckpt is not None:
        loaded = with_guide(loaded, guide_ckpt, device)
    loaded = prepare_for_sampling(loaded, sample_settings(loaded.config.sample, precision=precision, compile=compile_model), device, log)
    out_dir = Path(tempfile.mkdtemp(prefix="fm-demo-"))
    app = build_app(loaded, device, out_dir, max_images=max_images)
    # gradio prints its URL and notes ("Running on local URL", "Closing server") with print(): logs, which go to
    # stderr as every command's do (stdout carries results only, and a server has none).
    with contextlib.redirect_stdout(sys.stderr):
        _serve(app, host, port, share, out_dir)


def check_address(host: str, port: int) -> None:
    """--host/--port can be served on, said in one line before the model loads: gradio reports a host it cannot
    resolve as "Cannot find empty port" (and uvicorn logs a second line), a port in use with advice for its own API."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host} is not a name or address of this machine ({getattr(err, 'strerror', None) or err}): "
                         "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as err:
            raise UsageError(f"cannot serve on {host}:{port} ({err.strerror or err}): choose another --port (or --host)") from None


def _serve(app, host: str, port: int, share: bool, out_dir: Path) -> None:
    """app.launch, then wait until it stops; Ctrl-C / SIGTERM go on to fm's handler after the server is closed."""
    try:
        try:
            app.launch(
                server_name=host, server_port=port, share=share, allowed_paths=[str(out_dir)], show_error=True, ssr_mode=False, quiet=False,
                prevent_thread_lock=True,
            )  # fmt: skip
        except OSError:  # port in use, bad host: gradio says "Cannot find empty port" for both, with advice for its own API
            raise UsageError(f"cannot serve on {host}:{port}: the port is in use, or {host} is not an address of this machine; "
                             "choose another --port (or --host)") from None
        while app.is_running:  # our own wait: gradio's swallows Ctrl-C (and SIGTERM, fm's KeyboardInterrupt) and returns
            time.sleep(0.1)
    finally:  # the interrupt goes on to fm's handler (exit 130 / 143, one line)
        app.close()
        shutil.rmtree(out_dir, ignore_errors=True)
