"""`fm demo`: a Gradio page that shows samples forming step by step (gradio is the `demo` extra).

The sampling itself is fm's own (generate.iterate_samples with the checkpoint's solver, CFG and noise
per seed/index, so a demo image equals `fm sample` with the same settings). A model wrapper notes x_t
at every K-th solver step; the solver runs in a worker thread and `progressive` yields those grids
while it integrates.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import sample_settings
from .errors import UsageError
from .generate import LoadedModel, class_names_of, decode, iterate_samples
from .images import grid_image, save_image_atomic
from .sampling import FIXED_STEP_SOLVERS, SOLVERS, nfe_per_step

INSTALL_HINT = "pip install 'fm[demo]'  (or: pip install gradio)"
ALL_CLASSES = "all classes (cycling)"


@dataclass
class Frame:
    step: int  # solver steps done (for dopri5: network evaluations)
    total: int  # steps of the run (dopri5: 0, unknown in advance)
    t: float  # flow time of x, 0 = noise, 1 = data
    x: torch.Tensor  # [n, C, H, W] images in [-1, 1] (latents decoded) on the CPU
    final: bool = False
    nfe: int = 0  # network evaluations (final frame)


class _Cancelled(Exception):
    pass


class _PeekingModel:
    """Wraps the network: every K-th solver step, puts (step, t, x_t) on a queue before evaluating.

    Fixed-step solvers evaluate the velocity nfe_per_step times per step, the first at (x_t, t) of the
    step's start; with CFG the batch is [x; x] and the first half is x_t.
    """

    def __init__(self, model, n: int, solver: str, every: int, frames: queue.Queue, stop: threading.Event):
        self.model, self.n, self.solver, self.every = model, n, solver, every
        self.frames, self.stop = frames, stop
        self.calls, self.last_t = 0, -1.0
        self.per_step = nfe_per_step(solver) if solver in FIXED_STEP_SOLVERS else 1

    def __getattr__(self, name):  # null_class etc.
        return getattr(self.model, name)

    def __call__(self, x, t, **cond):
        if self.stop.is_set():
            raise _Cancelled()
        if self.calls % self.per_step == 0:
            step, tau = self.calls // self.per_step, float(t.reshape(-1)[0])
            if step % self.every == 0 and tau > self.last_t:  # dopri5 may re-evaluate at an earlier t after a rejected step
                self.last_t = tau
                self.frames.put((step, tau, x[: self.n].detach().clone()))
        self.calls += 1
        return self.model(x, t, **cond)


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
) -> Iterator[Frame]:
    """Yield x_t frames every `every` solver steps (the first is the noise), then the final samples."""
    if every < 1:
        raise UsageError("preview interval must be >= 1 step")
    if loaded.is_text and not (prompt and prompt.strip()):
        raise UsageError("this is a text-to-image model: enter a prompt")
    prompts = [prompt.strip()] * n if loaded.is_text else None
    frames: queue.Queue = queue.Queue()
    stop = threading.Event()
    peek = _PeekingModel(loaded.model, n, sample_cfg.solver, every, frames, stop)
    peeking = dataclasses.replace(loaded, model=peek)
    outcome: dict = {}

    def work():
        try:
            ((_, _, result),) = list(
                iterate_samples(
                    peeking, list(range(n)), seed=seed, sample_cfg=sample_cfg, batch_size=n, device=device,
                    class_label=None if loaded.is_text else class_label, prompts=prompts,
                )
            )
            outcome["result"] = result
        except BaseException as err:  # reported in the generator's thread
            outcome["error"] = err
        finally:
            frames.put(None)

    worker = threading.Thread(target=work, name="fm-demo-sampler", daemon=True)
    worker.start()
    total = sample_cfg.steps if sample_cfg.solver in FIXED_STEP_SOLVERS else 0
    try:
        while True:
            item = frames.get()
            if item is None:
                break
            step, t, x = item
            yield Frame(step=step, total=total, t=t, x=decode(loaded, x).cpu() if loaded.vae is not None else x.cpu())
    finally:
        stop.set()  # the consumer went away (closed page): the worker stops at its next evaluation
        worker.join()
    if "error" in outcome:
        err = outcome["error"]
        if isinstance(err, _Cancelled):
            return
        raise err
    result = outcome["result"]
    yield Frame(step=total or peek.calls, total=total, t=1.0, x=result.x.cpu(), final=True, nfe=result.nfe)


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
    """The Gradio Blocks app; its API endpoint is /generate (prompt, class, images, cfg, steps, solver, seed, every)."""
    gr = _import_gradio()
    cfg = loaded.config
    class_names = class_names_of(loaded) if loaded.num_classes else []
    kind = "text-to-image" if loaded.is_text else ("class-conditional" if class_names else "unconditional")

    def generate(prompt, class_choice, images, cfg_scale, steps, solver, seed, every):
        try:
            sample_cfg = sample_settings(cfg.sample, cfg=float(cfg_scale), steps=int(steps), solver=str(solver))
            label = None
            if class_names and class_choice not in (None, "", ALL_CLASSES):
                if class_choice not in class_names:
                    raise UsageError(f"unknown class {class_choice!r}")
                label = class_names.index(class_choice)
            n = int(images)
            if not 1 <= n <= max_images:
                raise UsageError(f"images must be between 1 and {max_images}")
            frames = progressive(
                loaded, n=n, seed=int(seed), sample_cfg=sample_cfg, every=int(every), device=device,
                prompt=prompt, class_label=label,
            )
            for frame in frames:
                if not frame.final:
                    of = f"/{frame.total}" if frame.total else " evaluations"
                    yield _display(frame.x), f"step {frame.step}{of}, t = {frame.t:.3f}", None
                    continue
                path = save_image_atomic(grid_image(frame.x), out_dir / f"fm-{kind.split('-')[0]}-seed{int(seed)}-{os.urandom(3).hex()}.png")
                yield _display(frame.x), f"done: {n} image(s), {frame.nfe} network evaluations ({solver}, cfg {float(cfg_scale):g})", str(path)
        except UsageError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="fm demo") as app:
        gr.Markdown(f"### fm demo: {kind} model, step {loaded.step}, {'x'.join(map(str, loaded.shape[1:]))} px\nThe preview shows x_t as the ODE integrates from noise (t = 0) to data (t = 1).")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a photo of ...", visible=loaded.is_text)
                choice = gr.Dropdown([ALL_CLASSES] + class_names, value=ALL_CLASSES, label="Class", visible=bool(class_names))
                images = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="Images")
                cfg_scale = gr.Slider(0.0, 10.0, value=cfg.sample.cfg, step=0.1, label="CFG scale (1 = off)")
                steps = gr.Slider(1, 250, value=cfg.sample.steps, step=1, label="Steps")
                solver = gr.Dropdown(list(SOLVERS), value=cfg.sample.solver, label="Solver")
                seed = gr.Number(value=0, precision=0, label="Seed")
                every = gr.Slider(1, 50, value=max(1, cfg.sample.steps // 10), step=1, label="Preview every K steps")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="samples", type="pil", format="png", elem_id="fm-output")
                status = gr.Markdown(elem_id="fm-status")
                grid_file = gr.File(label="grid (PNG, full resolution)")
        button.click(generate, [prompt, choice, images, cfg_scale, steps, solver, seed, every], [image, status, grid_file], api_name="generate")
    app.queue(default_concurrency_limit=1)  # one model, one generation at a time
    return app


def launch_demo(ckpt: str, *, host: str, port: int, share: bool, device: torch.device, vae=None, text_encoder=None, max_images: int = 16) -> None:
    _import_gradio()  # fail fast, before loading the model
    from .generate import load_for_sampling

    loaded = load_for_sampling(ckpt, device, vae=vae, text_encoder=text_encoder)
    out_dir = Path(tempfile.mkdtemp(prefix="fm-demo-"))
    app = build_app(loaded, device, out_dir, max_images=max_images)
    try:
        app.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(out_dir)], show_error=True, ssr_mode=False, quiet=False)
    except OSError as err:  # port in use, bad host
        raise UsageError(f"cannot serve on {host}:{port}: {err}") from None
