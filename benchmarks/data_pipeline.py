"""Benchmark the data pipeline: `fm prepare-data` on 50,000 32x32 images, then training-loader speed.

1. Prepare: runs `fm prepare-data` (a subprocess of this checkout, as a user would) on 50,000 images from
   each chosen source, timing it and sampling the memory of the whole process tree (parent + decode
   workers; PSS from /proc/PID/smaps_rollup, so pages shared after fork are not counted twice). The
   baseline is the same command with --limit 256: "above baseline" is what 50,000 images add.
   Sources: shapes (rendered), cifar10 (a synthetic archive in the real pickle format), tar (webdataset
   shards of PNG + caption, decoded by PIL in --workers processes), and optionally folder (50,000 PNG
   files in 10 class folders).
2. Read: the prepared shapes data through the DataLoader exactly as train.py builds it (RankBatchSampler
   + PreparedDataset.__getitems__ + collate_batched), images/s, for num_workers 0 and 2.
3. Train: the quickstart preset's DiT, one fwd + bwd + AdamW step per global batch (64), images/s.
Prints a JSON object on stdout; pass/fail lines on stderr.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/data_pipeline.py [--count 50000] [--sources shapes,cifar10,tar,folder]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=50000)
    ap.add_argument("--sources", default="shapes,cifar10,tar")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the training step")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fm-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"count": args.count, "workers": args.workers, "cpus": len(os.sched_getaffinity(0)), "prepare": {}}

    for source in args.sources.split(","):
        root = make_fixture(source, work, args.count)
        cmd = ["prepare-data", source, "--size", "32", "--workers", str(args.workers), "--force", "--json"]
        cmd += ["--count", str(args.count)] if source == "shapes" else []  # the other sources' fixtures hold args.count images
        cmd += ["--root", str(root)] if root else []
        base = run_measured(cmd + ["--out", str(work / f"{source}-base"), "--limit", "256"])
        full = run_measured(cmd + ["--out", str(work / f"{source}-full")])
        results["prepare"][source] = {
            "seconds": round(full["seconds"], 1),
            "cpu_seconds": round(full["cpu_seconds"], 1),
            "count": full["summary"]["count"],
            "images_per_s": round(full["summary"]["count"] / full["seconds"]),
            "peak_pss_mib": round(full["peak_pss"] / 2**20),
            "baseline_pss_mib": round(base["peak_pss"] / 2**20),
            "above_baseline_mib": round((full["peak_pss"] - base["peak_pss"]) / 2**20),
            "peak_rss_sum_mib": round(full["peak_rss"] / 2**20),
            "bytes": full["summary"]["bytes"],
        }
        report(f"prepare {source}", results["prepare"][source])

    data = work / "shapes-full"
    if not (data / "manifest.json").exists():
        from fmcli.data.prepare import prepare

        prepare("shapes", data, count=args.count, size=32, force=True)
    import torch

    torch.set_num_threads(args.threads)
    results["loader_images_per_s"] = {w: round(loader_throughput(data, w)) for w in (0, 2)}
    results["train_images_per_s"] = round(train_throughput(data), 1)
    results["ratio_loader_over_train"] = {w: round(v / results["train_images_per_s"], 1) for w, v in results["loader_images_per_s"].items()}
    report("loader images/s (num_workers: value)", results["loader_images_per_s"])
    report("quickstart DiT train images/s", results["train_images_per_s"])
    for name, r in results["prepare"].items():
        check(f"{name}: {r['count']} images in {r['seconds']} s < 120 s", r["seconds"] < 120)
        check(f"{name}: peak memory {r['above_baseline_mib']} MiB above baseline < 1024 MiB", r["above_baseline_mib"] < 1024)
    for w, ratio in results["ratio_loader_over_train"].items():
        check(f"loader (num_workers={w}) / train = {ratio}x >= 20x", ratio >= 20)
    print(json.dumps(results, indent=2))


# ------------------------------------------------------------------------------------------- fixtures


def make_fixture(source: str, work: Path, count: int) -> Path | None:
    """Input data in the source's real format (not timed). shapes needs none."""
    rng = np.random.default_rng(0)
    if source == "shapes":
        return None
    if source == "cifar10":
        archive = work / "cifar-10-python.tar.gz"
        if not archive.exists():
            per = -(-count // 5)
            with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
                meta = {b"label_names": [b"c%d" % k for k in range(10)]}
                _add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
                for b in range(5):
                    n = min(per, count - b * per)
                    batch = {b"data": _smooth(rng, n).reshape(n, -1), b"labels": rng.integers(0, 10, n).tolist()}
                    _add(tar, f"cifar-10-batches-py/data_batch_{b + 1}", pickle.dumps(batch, protocol=2))
        return archive
    if source == "folder":
        folder = work / "folder"
        if not folder.exists():
            from PIL import Image

            for k in range(10):
                (folder / f"class{k}").mkdir(parents=True)
            images = _smooth(rng, count)
            for i in range(count):
                Image.fromarray(images[i].transpose(1, 2, 0)).save(folder / f"class{i % 10}" / f"{i:06d}.png")
        return folder
    if source == "tar":
        shards = work / "shards"
        if not shards.exists():
            shards.mkdir()
            per = 5000
            for s in range(-(-count // per)):
                n = min(per, count - s * per)
                images = _smooth(rng, n)
                with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
                    for i in range(n):
                        buf = io.BytesIO()
                        from PIL import Image

                        Image.fromarray(images[i].transpose(1, 2, 0)).save(buf, format="PNG")
                        _add(tar, f"{s * per + i:08d}.png", buf.getvalue())
                        _add(tar, f"{s * per + i:08d}.txt", f"image {s * per + i}".encode())
        return Path(str(shards / "*.tar"))
    raise SystemExit(f"unknown source {source}")


def _smooth(rng, n) -> np.ndarray:
    """Natural-ish images (smooth colour fields plus noise), so PNGs are not incompressible noise."""
    low = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.float32)
    up = low.repeat(8, axis=2).repeat(8, axis=3)
    return np.clip(up + rng.normal(0, 8, up.shape), 0, 255).astype(np.uint8)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------- measurement


def run_measured(args: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fmcli.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"pss": 0, "rss": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pss, rss = tree_memory(proc.pid)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"fm {' '.join(args)} failed ({proc.returncode}): {err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and its reaped decode workers
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "summary": json.loads(out), "peak_pss": peak["pss"], "peak_rss": peak["rss"]}


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pss = rss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


def loader_throughput(data: Path, workers: int, batches: int = 400) -> float:
    """Images/s through the DataLoader as train.py builds it (global batch 64, one process)."""
    from torch.utils.data import DataLoader

    from fmcli.data.dataset import PreparedDataset, collate_batched
    from fmcli.data.sampler import RankBatchSampler

    ds = PreparedDataset(data)
    ctx = SimpleNamespace(world_size=1, rank=0)
    sampler = RankBatchSampler(len(ds), 64, 64, 1, ctx, 0, 0, 0)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_batched, prefetch_factor=2 if workers else None)
    it = iter(loader)
    for _ in range(10):  # warm up workers and the page cache
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["x"])
    seconds = time.perf_counter() - start
    del it
    return n / seconds


def train_throughput(data: Path, steps: int = 10) -> float:
    """Images/s of the quickstart DiT: interpolate, forward, MSE, backward, clip, AdamW step (batch 64)."""
    import torch

    from fmcli.config import load_config
    from fmcli.data.dataset import PreparedDataset
    from fmcli.flow import flow_matching_loss, interpolate, sample_times
    from fmcli.models import build_model
    from fmcli.config import resolve as resolve_data_fields
    from fmcli.optim import build_optimizer

    ds = PreparedDataset(data)
    cfg = resolve_data_fields(load_config("quickstart"), ds.manifest)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    batch = ds.__getitems__(list(range(cfg.train.global_batch_size)))

    def step():
        x1, y = batch["x"], batch["y"]
        x0 = torch.randn_like(x1)
        t = sample_times(len(x1), cfg.flow.time_sampler)
        xt, ut = interpolate(x0, x1, t, cfg.flow.sigma_min)
        loss = flow_matching_loss(model(xt, t, y=y), ut)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        for o in optimizer.optimizers:
            o.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * cfg.train.global_batch_size / (time.perf_counter() - start)


def report(name, value) -> None:
    print(f"{name}: {value}", file=sys.stderr)


def check(name: str, ok: bool) -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
