"""`fm eval`: fidelity of a checkpoint (or an image folder) against a prepared dataset, each metric beside its
real-vs-real floor, optionally swept over guidance scale, guidance interval and NFE.

The real-vs-real floor: the dataset's images are split by a seeded permutation into two disjoint halves. The
second half is the reference every score is measured against (`n` of its images, `n` = the generated count,
capped at the half: the first `n` of the permutation, a random draw whatever order the dataset stores its images
in, e.g. class by class); `n` images of the first half, drawn alike, are scored against the same reference as if
they were samples. A perfect generator scores the floor, not zero: FD, KID and the k-NN metrics of `n`
samples carry a bias that the floor measures at the same `n`. Conditional accuracy's floor is the domain
classifier's accuracy on its held-out real images. Which images a split draws moves every score (the floor's FD
most: by a factor of 2 between draws at n = 1,000), so `fm eval` scores against several splits (`--splits`) and
reports each number's mean over them with its standard deviation (`over_draws`).

Metrics (fmcli.metrics) per feature space (fmcli.features): FD, KID, precision, recall, density, coverage;
in the domain space also the conditional accuracy and the per-class FD (mean over classes, and each class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import metrics
from .errors import UsageError
from .evaluate import GeneratedFeatures as Generated, ScoreRequest, sharded_features


@dataclass
class Reference:
    """Real features of the reference half and of the floor half, per feature space."""

    extractors: dict  # space -> extractor
    ref: dict[str, np.ndarray]
    floor: dict[str, np.ndarray]
    ref_labels: np.ndarray | None
    floor_labels: np.ndarray | None
    class_names: list[str]
    image_shape: tuple[int, int, int]
    floor_scores: dict = field(default_factory=dict)  # filled by `floor`


def split_halves(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(floor half, reference half): disjoint index sets of a seeded permutation of `count` images, each in the
    permutation's order, so that the first `n` of either are a random draw. (Sorted halves gave the lowest indices:
    on a dataset stored class by class, as `fm prepare-data folder` stores class folders, only its first classes.)"""
    order = np.random.default_rng(seed).permutation(count)
    return order[: count // 2], order[count // 2 :]


def prepare_reference(data: Path, extractors: dict, n: int, *, seed: int = 0, batch_size: int = 256, log=None) -> Reference:
    """Features of `n` reference and `n` floor images of the prepared pixel dataset `data` (each half capped)."""
    return prepare_references(data, extractors, n, seeds=[seed], batch_size=batch_size, log=log)[0]


def prepare_references(data: Path, extractors: dict, n: int, *, seeds, batch_size: int = 256, log=None, ctx=None) -> list[Reference]:
    """One Reference per split seed (`prepare_reference`'s), the features of every image any of them reads
    computed once: several draws of the reference and the floor cost little more than one. Collective under a `ctx`
    of several ranks (training's evaluator): each rank computes the features of its block of those images and every
    rank gets them all, so none waits at a collective while one computes them alone."""
    from .data.dataset import read_manifest

    manifest = read_manifest(data)
    if manifest["kind"] != "pixels":
        raise UsageError(f"{data} holds {manifest['kind']}, not pixels: the fidelity metrics compare images; pass a pixel dataset of "
                         "the same images (`fm prepare-data` without --vae)")  # fmt: skip
    x = np.load(Path(data) / "x.npy", mmap_mode="r")
    if len(x) < 2 * 6:
        raise UsageError(f"{data} has {len(x)} images: the floor needs two disjoint halves of at least 6 (k-NN metrics with k=5)")
    y = np.load(Path(data) / "y.npy") if (Path(data) / "y.npy").is_file() else None
    draws = []
    for seed in seeds:
        floor_idx, ref_idx = split_halves(len(x), seed)
        draws.append((np.sort(floor_idx[:n]), np.sort(ref_idx[:n])))  # a random n of each half, read in file order
    union = np.unique(np.concatenate([idx for draw in draws for idx in draw]))
    feats = {space: union_features(x, union, ext, batch_size, ctx) for space, ext in extractors.items()}
    if log:
        log(f"{', '.join(extractors)} features of {len(union)} images of {data}: {len(draws)} draw(s) of {len(draws[0][1])} reference + "
            f"{len(draws[0][0])} floor images")  # fmt: skip
    names = [str(c) for c in (manifest.get("class_names") or range(manifest.get("num_classes") or 0))]
    out = []
    for floor_idx, ref_idx in draws:
        rows = {"ref": np.searchsorted(union, ref_idx), "floor": np.searchsorted(union, floor_idx)}
        out.append(Reference(extractors, {s: f[rows["ref"]] for s, f in feats.items()}, {s: f[rows["floor"]] for s, f in feats.items()},
                             y[ref_idx] if y is not None else None, y[floor_idx] if y is not None else None, names, tuple(x.shape[1:])))  # fmt: skip
    return out


def union_features(x, rows: np.ndarray, extractor, batch_size: int, ctx=None) -> np.ndarray:
    """Features of the images x[rows] in that order; under a `ctx` of several ranks each rank computes its
    contiguous block of the rows and the blocks, gathered in rank order, are the whole (collective)."""
    from . import distributed as D

    shared = ctx is not None and ctx.world_size > 1
    mine = rows[D.block_of(len(rows), ctx)] if shared else rows
    parts = [features_of(np.asarray(x[mine[i : i + batch_size]]), extractor, batch_size) for i in range(0, len(mine), batch_size)]
    local = np.concatenate(parts) if parts else None  # None: this rank's block is empty (fewer rows than ranks)
    return np.concatenate([part for part in D.all_gather_objects(local, ctx) if part is not None]) if shared else local


def proportional_labels(n: int, counts) -> np.ndarray:
    """n class labels in the proportions of `counts` (a dataset's images per class): each class gets its quota's
    whole part and the largest remainders the rest (Hamilton), and the classes interleave by the position of each
    label within its class ((j + 1/2) / count, ties by class): equal counts give i mod K, as generate.labels_for."""
    counts = np.asarray(counts, dtype=np.float64)
    quota = n * counts / counts.sum()
    alloc = np.floor(quota).astype(int)
    order = sorted(range(len(counts)), key=lambda k: (-(quota[k] - alloc[k]), k))  # largest remainder first, ties by class
    for k in order[: n - alloc.sum()]:
        alloc[k] += 1
    slots = sorted(((j + 0.5) / c, k) for k, c in enumerate(alloc) for j in range(c))
    return np.array([k for _, k in slots], dtype=np.int64)


def data_labels(data: Path, num_classes: int) -> np.ndarray | None:
    """The images per class of the labelled dataset `data` when it has the model's number of classes (check_classes
    asks the same names in the same order where the domain space reads them), else None (the classes cycle)."""
    from .data.dataset import read_manifest

    if not num_classes or (read_manifest(data).get("num_classes") or 0) != num_classes or not (Path(data) / "y.npy").is_file():
        return None
    counts = np.bincount(np.load(Path(data) / "y.npy"), minlength=num_classes)
    return counts if counts.all() else None  # a class without images: nothing to be proportional to, cycle as before


def over_draws(results: list[dict]) -> dict:
    """Scores against several reference draws as one: each number the mean over the draws that have it (a class
    a small draw lacks has no per-class FD there), and each metric's standard deviation over the draws beside it
    (`fd_sd`, `recall_sd`, ...): how much the choice of real images moves it. One draw: its scores as they are."""
    if len(results) == 1:
        return results[0]

    def merge(values: list):
        present = [v for v in values if v is not None]
        if not present:  # None in every draw (no per-class FD where no class has samples)
            return None
        if isinstance(present[0], dict):
            return {k: merge([v.get(k) for v in present]) for k in dict.fromkeys(k for v in present for k in v)}
        if isinstance(present[0], (int, float)) and not isinstance(present[0], bool):
            return float(np.mean(present))
        return present[0]

    out = merge(results)
    if out.get("per_class_fd"):  # the mean over the classes shown (draws may lack different classes)
        out["per_class_fd_mean"] = float(np.mean(list(out["per_class_fd"].values())))
    for space, scores in out["metrics"].items():
        for key in list(scores):
            scores[f"{key}_sd"] = float(np.std([r["metrics"][space][key] for r in results], ddof=1))
    return out


def features_of(images: np.ndarray, extractor, batch_size: int = 256) -> np.ndarray:
    """Features of uint8 [N,C,H,W] images (grey repeated to RGB, as every extractor reads RGB)."""
    from .evaluate import to_rgb

    return np.concatenate([extractor(to_rgb(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))) for i in range(0, len(images), batch_size)])


def floor(reference: Reference, *, k: int = 5, kid: bool = True) -> dict:
    """The real-vs-real scores (the floor half scored as if it were samples); cached on the reference."""
    if not reference.floor_scores:
        as_samples = Generated(reference.floor, reference.floor_labels)
        reference.floor_scores = score(reference, as_samples, k=k, kid=kid, real_samples=True)
    return reference.floor_scores


def score(reference: Reference, generated: Generated, *, k: int = 5, kid: bool = True, real_samples: bool = False) -> dict:
    """Every metric of `generated` against the reference, per feature space; conditional accuracy and per-class
    FD in the domain space when the samples have labels (the floor's accuracy is the classifier's held-out one)."""
    out: dict = {"metrics": {}}
    for space, feats in generated.feats.items():
        if len(feats) < k + 1:
            raise UsageError(f"{len(feats)} samples: the k-NN metrics need more than k={k}")
        out["metrics"][space] = metrics.fidelity(reference.ref[space], feats, k=k, kid=kid).to_dict()
    domain = reference.extractors.get("domain")
    if domain is None or generated.labels is None or reference.ref_labels is None:
        return out
    feats = generated.feats["domain"]
    if real_samples:  # real images' accuracy: on the held-out ones, which the classifier never trained on
        out["accuracy"] = domain.trained.held_out_accuracy
    else:
        with torch.no_grad():  # the head on the features gives the classifier's own predictions
            predicted = domain.model.head(torch.from_numpy(feats).float().to(domain.device)).argmax(1).cpu().numpy()
        out["accuracy"] = metrics.accuracy(predicted, generated.labels)
    per_class = metrics.per_class_fd(reference.ref["domain"], reference.ref_labels, feats, generated.labels)
    out["per_class_fd"] = {reference.class_names[c] if c < len(reference.class_names) else str(c): v for c, v in per_class.items()}
    out["per_class_fd_mean"] = float(np.mean(list(per_class.values()))) if per_class else None
    return out


# ------------------------------------------------------------------------------------------ samples


def check_scorable(loaded, data_shape: tuple | None = None, data=None, data_manifest: dict | None = None) -> None:
    """What `fm eval --ckpt` cannot score: latent and text models, images of another shape than the dataset
    `data`'s `data_shape` (when given), and, when `data_manifest` is given (the domain space is scored), classes
    other than the data's (check_classes)."""
    if loaded.info.get("kind", "pixels") != "pixels" or loaded.is_text:
        what, prompts = ("text", " --prompts FILE") if loaded.is_text else ("latent", "")
        raise UsageError(f"fm eval --ckpt scores class-conditional or unconditional pixel models, not {what} ones: write the samples with "
                         f"`fm sample --ckpt CKPT -n N{prompts} --out DIR` and score them with `fm eval --gen DIR --data PIXELS`")  # fmt: skip
    if data_shape is not None and loaded.shape != data_shape:
        raise UsageError(f"the model makes {list(loaded.shape)} images but {data} holds {list(data_shape)}")
    if data_manifest is not None:
        check_classes(loaded.num_classes, loaded.info.get("class_names"), data_manifest, f"{data}")


def check_classes(num_classes: int, class_names: list | None, manifest: dict, data: str) -> None:
    """A class-conditional model scored in the domain space against labelled data must have the data's classes in
    the data's order: sample i is asked for class i % num_classes and the classifier's class c is the data's, so the
    conditional accuracy and the per-class FD would otherwise compare one class's samples with another's images."""
    count, names = manifest.get("num_classes") or 0, manifest.get("class_names")
    if not num_classes or not count:
        return
    if num_classes != count or (class_names and names and list(class_names) != list(names)):
        mine = ", ".join(class_names) if class_names else f"{num_classes} classes"
        theirs = ", ".join(names) if names else f"{count} classes"
        raise UsageError(f"the model's classes ({mine}) are not those of {data} ({theirs}) in that order: its conditional accuracy and "
                         "per-class FD would compare samples of one class with images of another; score against the data it was "
                         "trained on, or features that read no classes (inception, dinov2 or tiny)")  # fmt: skip


def folder_images(path: Path, shape: tuple[int, int, int], log=None) -> np.ndarray:
    """Every image under `path` (evaluate.image_files: `fm sample`'s grid skipped) as uint8 [N,3,H,W]; each
    must have the dataset's size."""
    from .evaluate import image_files, read_rgb

    files = image_files(path, log)
    if not files:
        raise UsageError(f"--gen {path} holds no images")
    out = []
    for f in files:
        arr = read_rgb(f)
        if arr.shape[:2] != tuple(shape[1:]):
            raise UsageError(f"{f} is {arr.shape[1]}x{arr.shape[0]} but the dataset's images are {shape[2]}x{shape[1]}")
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out)


# ---------------------------------------------------------------------------------------- the command


@dataclass(kw_only=True)
class EvalRequest(ScoreRequest):
    """What `fm eval` was asked for (the CLI fills it and checks its flags; `evaluate_fidelity` runs it)."""

    data: Path
    spaces: tuple[str, ...] = ("domain",)
    cfgs: list[float] | None = None
    intervals: list[tuple[float, float] | None] | None = None
    nfes: list[int] | None = None
    classifier: str | None = None
    classifier_seed: int = 0
    classifier_steps: int | None = None  # None: features.CLASSIFIER_STEPS
    inception: str | None = None
    dinov2: str | None = None
    k: int = 5
    kid: bool = True
    split_seed: int = 0  # the first draw's; draw i splits with split_seed + i
    splits: int = 5  # reference draws: each score is the mean over them, its spread beside it (over_draws)


def evaluate_fidelity(req: EvalRequest, *, device, log=None, progress_factory=None) -> tuple[dict, list[dict]]:
    """(the floor, one row per sampling setting) for a checkpoint, or one row for an image folder; every row
    also carries the floor (key "floor"), so that each JSON row stands on its own."""
    from .data.dataset import validate_prepared
    from .features import build_space
    from .generate import guidance_that_runs, guide_record, nfe_fields, sampling_record, settings_record

    manifest = validate_prepared(req.data)  # as `fm train` does, before the classifier reads it: a damaged dataset is one line
    loaded = base = None
    if req.ckpt is not None:  # a bad checkpoint (or guide) fails before the reference pass
        from .evaluate import load_sampler

        # What the model cannot do, before the precision probe and before the classifier trains (a minute).
        loaded, base = load_sampler(req.ckpt, req.guide_ckpt, req.sample_overrides, ema=req.ema, device=device, log=log, ctx=None,
                                    check=lambda m: check_scorable(m, _data_shape(req.data), req.data, manifest if "domain" in req.spaces else None))
        # A budget or setting no solver run meets is refused too; each row reports what ran (guidance_that_runs), once.
        sweep = distinct_runs(sweep_settings(base, req.cfgs, req.intervals, req.nfes, log, runs=lambda s: guidance_that_runs(loaded, s, log)), log)
    images = folder_images(req.gen, _data_shape(req.data), log) if req.gen is not None else None
    n = len(images) if images is not None else req.num_samples
    if n < req.k + 1:
        raise UsageError(f"{n} {'images in --gen' if images is not None else 'samples'}: the k-NN metrics need more than k={req.k}")
    # The spaces read from weight files first: a missing --dinov2 / --inception stops before the classifier trains.
    built = {
        s: build_space(s, data=req.data, device=device, classifier=req.classifier, seed=req.classifier_seed, steps=req.classifier_steps,
                       inception=req.inception, dinov2=req.dinov2, log=log)
        for s in sorted(req.spaces, key=lambda space: space == "domain")
    }  # fmt: skip
    extractors = {s: built[s] for s in req.spaces}
    references = prepare_references(req.data, extractors, n, seeds=range(req.split_seed, req.split_seed + req.splits), log=log)
    sizes = {"ref_count": len(next(iter(references[0].ref.values()))), "floor_count": len(next(iter(references[0].floor.values()))), "splits": req.splits}
    floor_row = {**sizes, **over_draws([floor(r, k=req.k, kid=req.kid) for r in references])}
    scored = lambda generated: over_draws([score(r, generated, k=req.k, kid=req.kid) for r in references])  # noqa: E731
    if "domain" in extractors:
        floor_row["classifier_held_out"] = extractors["domain"].trained.held_out
    if images is not None:
        generated = Generated({s: features_of(images, e) for s, e in extractors.items()}, None)
        return floor_row, [{"gen": str(req.gen), "num_samples": n, **scored(generated), "floor": floor_row}]
    # Classes asked in the data's proportions: against imbalanced data, a cycle through the classes would score even
    # a perfect model worse than the floor (whose halves have the data's class mix).
    class_counts = data_labels(req.data, loaded.num_classes)
    asked = proportional_labels(n, class_counts) if class_counts is not None else None
    rows = []
    for settings in sweep:
        if log:
            log(f"sampling {n}: {_solver_label(settings_record(settings))}, {settings.guidance} {settings.cfg:g}, interval {settings.guidance_interval}")
        generated = sharded_features(loaded, n, extractors, seed=req.seed, sample_cfg=settings, batch_size=req.batch_size, device=device,
                                     progress_factory=progress_factory, labels=asked)  # fmt: skip
        rows.append({
            "ckpt": str(req.ckpt), "step": loaded.step, **settings_record(settings), **sampling_record(loaded),
            "nfe_per_sample": generated.nfe_per_sample, **nfe_fields(generated.nfe_per_sample, generated.nfe_max),
            "gen_seconds": round(generated.gen_seconds, 3), "num_samples": n, "seed": req.seed,
            **guide_record(settings, req.guide_ckpt),  # the guide that ran, as fm fid's rows name it
            **scored(generated), "floor": floor_row,
        })  # fmt: skip
    return floor_row, rows


def sweep_settings(base, cfgs, intervals, nfes, log=None, runs=lambda settings: settings) -> list:
    """Every combination of the swept guidance scales, intervals and NFE budgets (None: the base's value); an
    NFE budget the solver cannot meet is skipped with a note (evaluate.nfe_sweep), never run over budget.
    `runs(settings)`: the guidance as it runs (generate.guidance_that_runs), before the budgets buy their steps:
    cfg-zero's zero-init steps come on top of a budget only where they evaluate nothing, which unguided they do."""
    from .config import sample_settings
    from .evaluate import nfe_sweep

    out = []
    for w in cfgs or [None]:
        for interval in intervals or [None]:
            settings = runs(sample_settings(base, cfg=w, guidance_interval=interval))
            out.extend([s for _, s in nfe_sweep(settings, nfes, log)] if nfes else [settings])
    return out


def distinct_runs(sweep: list, log=None) -> list:
    """The sweep's settings as they run, each once: NFE budgets that buy the same steps (heun at 8 and 9) or guidance
    scales an unconditional model runs unguided would give rows of one run, twice; so would cfg 1 at two guidance
    intervals (it guides nothing). `sweep` is as it runs: generate.guidance_that_runs already read those unguided."""
    out = []
    for settings in sweep:
        if settings not in out:
            out.append(settings)
        elif log:
            log(f"note: {settings.solver} {settings.steps} steps, {settings.guidance} {settings.cfg:g} comes out of the sweep twice: one row")
    return out


def _data_shape(data: Path) -> tuple[int, int, int]:
    """The image shape of the pixel dataset `data` (a latent dataset's shape is its latents', not its images')."""
    from .data.dataset import read_manifest

    manifest = read_manifest(data)
    if manifest["kind"] != "pixels":
        raise UsageError(f"{data} holds {manifest['kind']}, not pixels: the fidelity metrics compare images; pass a pixel dataset of "
                         "the same images (`fm prepare-data` without --vae)")  # fmt: skip
    return tuple(manifest["shape"])


# ------------------------------------------------------------------------------------- during training


class TrainingFidelity:
    """eval.every in the domain (or DINOv2) features: FD, precision, recall, density, coverage and, for
    class-conditional models, accuracy of the EMA model, each logged beside its real-vs-real floor.

    The reference is eval.ref, else the training data. Every rank builds the extractor (generation is sharded;
    the classifier is deterministic, so ranks that train it agree); every rank computes the features of its share
    of the reference images, and the main rank holds the reference.
    """

    def __init__(self, cfg, data_path, device, log=None, with_reference: bool = True, ctx=None):
        from .data.dataset import read_manifest, validate_prepared
        from .features import build_space

        data = Path(cfg.eval.ref or data_path)
        if cfg.eval.ref:  # the training data was validated at launch; eval.ref was not
            validate_prepared(data)
            # As `fm eval` refuses a model whose images differ from --data: the samples have the training data's shape.
            ref_shape, model_shape = tuple(read_manifest(data)["shape"]), tuple(read_manifest(data_path)["shape"])
            if ref_shape != model_shape:
                raise UsageError(f"eval.ref {data} holds {list(ref_shape)} images but the model makes {list(model_shape)} ones; "
                                 "give a reference of the training data's size and channels")  # fmt: skip
            if cfg.eval.features == "domain":  # the samples' classes are the training data's
                check_classes(cfg.model.num_classes, read_manifest(data_path).get("class_names"), read_manifest(data), f"eval.ref {data}")
        self.num_samples, self.device, self.space = cfg.eval.num_samples, device, cfg.eval.features
        counts = data_labels(data, cfg.model.num_classes)  # the classes asked, in the reference's proportions (fm eval's)
        self.labels = proportional_labels(self.num_samples, counts) if counts is not None else None
        self.extractor = build_space(self.space, data=data, device=device, classifier=cfg.eval.classifier, dinov2=cfg.eval.dinov2, log=log)
        self.reference = None
        # The reference's features: every rank its share under `ctx` (collective); the rank `with_reference` keeps
        # them and scores its floor (the k-NN metrics: seconds to minutes, within FM_DIST_TIMEOUT_S).
        if with_reference or (ctx is not None and ctx.world_size > 1):
            reference = prepare_references(data, {self.space: self.extractor}, cfg.eval.num_samples, seeds=[0], log=log, ctx=ctx)[0]
            if with_reference:
                floor(reference, kid=False)
                self.reference = reference

    def __call__(self, model: torch.nn.Module, cfg, step: int, batch_size: int, ctx=None) -> dict | None:
        """`model` (the EMA) sampled as `cfg` (the run's config now) says; the rank holding the reference returns the record."""
        from .generate import LoadedModel

        loaded = LoadedModel(model=model, config=cfg, info={"kind": "pixels"}, step=step)
        n = self.num_samples
        generated = sharded_features(
            loaded, n, {self.space: self.extractor}, seed=cfg.train.seed, sample_cfg=cfg.sample, batch_size=batch_size, device=self.device, ctx=ctx,
            labels=self.labels,
        )  # fmt: skip
        if self.reference is None:
            return None
        scores = score(self.reference, Generated(generated.feats, generated.labels), kid=False)
        record = {"step": step, **_flat(scores, self.space), **{f"{k}_floor": v for k, v in _flat(self.reference.floor_scores, self.space).items()}}
        return {**record, "eval_features": self.space, "eval_num_samples": n, "eval_gen_seconds": round(generated.gen_seconds, 3)}


def _flat(scores: dict, space: str) -> dict:
    """{"fd", "precision", "recall", "density", "coverage"[, "accuracy"]} of one space, for metrics.jsonl."""
    out = dict(scores["metrics"][space])
    if "accuracy" in scores:
        out["accuracy"] = scores["accuracy"]
    return out


# ------------------------------------------------------------------------------------------ output


def _row_label(r: dict) -> str:
    """A row's setting as the table shows it: the folder scored, or guidance, scale, interval, solver and steps."""
    if "gen" in r:
        return Path(r["gen"]).name
    interval = "" if r["guidance_interval"] is None else f" [{r['guidance_interval'][0]:g},{r['guidance_interval'][1]:g}]"
    return f"{r['guidance']} {r['cfg']:g}{interval}, {_solver_label(r)}"


def _solver_label(r: dict) -> str:
    """euler 50, or dopri5 1e-05/1e-05 (its tolerances: it chooses its own steps)."""
    if "rtol" in r:
        return f"{r['solver']} {r['rtol']:g}/{r['atol']:g}"
    return f"{r['solver']} {r['steps']}"


def format_table(floor_row: dict, rows: list[dict]) -> str:
    """The floor and every row as plain text: one line per (row, feature space); over several reference draws each
    number is their mean, and FD's standard deviation over them follows it (`FD sd`)."""
    head = f"{'setting':<38} {'features':<10} {'FD':>9} {'FD sd':>7} {'KID':>9} {'prec':>6} {'recall':>6} {'dens':>6} {'cover':>6} {'acc':>6} {'NFE':>5}"
    lines = [head]

    def line(label, scores, nfe=None):
        for space, m in scores["metrics"].items():
            acc = scores.get("accuracy") if space == "domain" else None
            acc = f"{acc:>6.3f}" if acc is not None else f"{'-':>6}"
            kid = f"{m['kid']:>9.5f}" if "kid" in m else f"{'-':>9}"
            sd = f"{m['fd_sd']:>7.4f}" if "fd_sd" in m else f"{'-':>7}"
            lines.append(
                f"{label:<38} {space:<10} {m['fd']:>9.4f} {sd} {kid} {m['precision']:>6.3f} {m['recall']:>6.3f} {m['density']:>6.3f} "
                f"{m['coverage']:>6.3f} {acc} {'' if nfe is None else f'{nfe:g}':>5}"
            )
            label = ""

    draws = f", {floor_row['splits']} draws" if floor_row.get("splits", 1) > 1 else ""
    line(f"real vs real ({floor_row['floor_count']} vs {floor_row['ref_count']}{draws})", floor_row)
    labels = [_row_label(r) for r in rows]
    for label, r in zip(labels, rows):
        line(label, r, r.get("nfe_per_sample"))
    # each mean under its row's own label: rows of an --nfe or --guidance-interval sweep share their cfg
    means = [(label, r["per_class_fd_mean"]) for label, r in zip(labels, rows) if r.get("per_class_fd_mean") is not None]
    if means and floor_row.get("per_class_fd_mean") is not None:
        shown = ", ".join(f"{label}: {m:.4f}" for label, m in means)
        lines.append(f"per-class FD (domain), mean over classes: floor {floor_row['per_class_fd_mean']:.4f}; {shown}")
    return "\n".join(lines)
