"""fm prepare-data and the prepared format: real-format fixtures built on the fly, exact round trips."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import fm_in_process, run_fm
from fmcli.data.decode import resize_center_crop
from fmcli.data.prepare import prepare
from fmcli.data.dataset import PreparedDataset, PreparedWriter, read_captions, read_manifest
from fmcli.data.shapes import prepare_shapes
from fmcli.errors import UsageError

RNG = np.random.default_rng(1234)
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


def _load(path):
    return read_manifest(path), np.load(path / "x.npy"), (np.load(path / "y.npy") if (path / "y.npy").exists() else None)


# ------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(n):
    # Written the way the real archive is: bytes keys, data [N,3072] uint8 (R plane, G plane, B plane).
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in RNG.integers(0, 10, n)]
    return {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"f%d.png" % i for i in range(n)]}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    batches = {"data_batch_1": _cifar_batch(12), "data_batch_2": _cifar_batch(5), "test_batch": _cifar_batch(7)}
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": 12, b"num_vis": 3072}
    for name, obj in [*batches.items(), ("batches.meta", meta)]:
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["test_batch", "batches.meta", "data_batch_2", "data_batch_1"]:  # order must not matter
            tar.add(folder / name, arcname=f"cifar-10-batches-py/{name}")
    return archive, folder, batches


def test_cifar10_archive_round_trip_exact(cifar, tmp_path):
    archive, _, batches = cifar
    res = fm_in_process("prepare-data", "cifar10", "--root", archive, "--out", tmp_path / "c", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["count"], summary["skipped"], summary["classes"]) == (17, 0, 10)
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    manifest, x, y = _load(tmp_path / "c")
    want = [batches["data_batch_1"], batches["data_batch_2"]]
    assert np.array_equal(x, np.concatenate([b[b"data"] for b in want]).reshape(-1, 3, 32, 32))
    assert y.tolist() == want[0][b"labels"] + want[1][b"labels"]
    assert manifest["class_names"] == CIFAR_NAMES and manifest["num_classes"] == 10 and manifest["shape"] == [3, 32, 32]


def test_cifar10_extracted_folder_test_split(cifar, tmp_path):
    _, folder, batches = cifar
    summary = prepare("cifar10", tmp_path / "t", root=folder.parent, split="test")
    _, x, y = _load(tmp_path / "t")
    assert summary.count == 7
    assert np.array_equal(x, batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))
    assert y.tolist() == batches["test_batch"][b"labels"]
    prepare("cifar10", tmp_path / "t16", root=folder, split="test", size=16)
    row = batches["test_batch"][b"data"][2].reshape(3, 32, 32).transpose(1, 2, 0)
    ref = np.asarray(Image.fromarray(row).resize((16, 16), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert np.array_equal(np.load(tmp_path / "t16" / "x.npy")[2], ref)


@pytest.mark.parametrize("damage", ["truncated", "not-an-archive", "no-batches", "damaged-pixels"])
def test_cifar10_bad_archive_is_usage_error(cifar, tmp_path, damage):
    archive, folder, _ = cifar
    bad = tmp_path / "cifar-10-python.tar.gz"
    if damage == "truncated":
        bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif damage == "damaged-pixels":  # random pixels are stored uncompressed: a flipped byte decodes, only gzip's CRC sees it
        raw = bytearray(archive.read_bytes())
        raw[len(raw) * 3 // 4] ^= 0xFF
        with pytest.raises(gzip.BadGzipFile, match="CRC"):
            gzip.decompress(bytes(raw))
        bad.write_bytes(bytes(raw))
    elif damage == "not-an-archive":
        bad.write_bytes(b"hello" * 100)
    else:
        with tarfile.open(bad, "w:gz") as tar:
            tar.add(folder / "batches.meta", arcname="cifar-10-batches-py/batches.meta")
    with pytest.raises(UsageError):
        prepare("cifar10", tmp_path / "out", root=tmp_path)
    assert _leftovers(tmp_path, "out") == []


def test_cifar10_refuses_pickled_code(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()

    class Boom:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"]}))
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Boom(), "labels": [0]}))
    with pytest.raises(UsageError, match="refusing to load"):
        prepare("cifar10", tmp_path / "out", root=folder)
    assert _leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------------- MNIST


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    train_x, train_y = RNG.integers(0, 256, (9, 28, 28), dtype=np.uint8), RNG.integers(0, 10, 9).astype(np.uint8)
    test_x, test_y = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8), RNG.integers(0, 10, 4).astype(np.uint8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(train_x)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(train_y)))
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx(test_x))  # raw, not gzipped
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx(test_y))
    return root, (train_x, train_y), (test_x, test_y)


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_idx_gz_and_raw_round_trip(mnist, tmp_path, split):
    root, train, test = mnist
    images, labels = train if split == "train" else test
    summary = prepare("mnist", tmp_path / "m", root=root, split=split, size=28)
    manifest, x, y = _load(tmp_path / "m")
    assert summary.count == len(images) and manifest["shape"] == [1, 28, 28]
    assert np.array_equal(x[:, 0], images) and np.array_equal(y, labels)
    assert manifest["class_names"] == [str(d) for d in range(10)]


def test_mnist_resized_keeps_one_channel(mnist, tmp_path):
    root, (images, _), _ = mnist
    prepare("mnist", tmp_path / "m32", root=root, size=32)
    x = np.load(tmp_path / "m32" / "x.npy")
    ref = np.asarray(Image.fromarray(images[3]).resize((32, 32), Image.Resampling.LANCZOS))
    assert x.shape == (9, 1, 32, 32) and np.array_equal(x[3, 0], ref)


def _mnist_copy(mnist, tmp_path) -> Path:
    """A copy of the mnist fixture's files to damage."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in mnist[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    return bad


def test_mnist_truncated_file_is_exit_2(mnist, tmp_path):
    bad = _mnist_copy(mnist, tmp_path)
    raw = (bad / "t10k-images-idx3-ubyte").read_bytes()
    (bad / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    res = fm_in_process("prepare-data", "mnist", "--root", bad, "--split", "test", "--out", tmp_path / "o")
    assert res.returncode == 2 and "truncated" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert _leftovers(tmp_path, "o") == []


def test_mnist_gz_with_a_damaged_deflate_stream_is_exit_2_naming_it(mnist, tmp_path):
    import zlib

    bad = _mnist_copy(mnist, tmp_path)
    raw = bytearray(gzip.compress(_idx((np.arange(300) % 10).astype(np.uint8)), mtime=0))
    raw[10:12] = bytes([raw[10] ^ 0xFF, raw[11] ^ 0xFF])  # the first compressed block's header (after gzip's 10 bytes)
    with pytest.raises(zlib.error):  # what gzip raises for it: not an OSError like a bad CRC
        gzip.decompress(bytes(raw))
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    res = fm_in_process("prepare-data", "mnist", "--root", bad, "--out", tmp_path / "o")
    assert res.returncode == 2 and "cannot read" in res.stderr and "train-labels-idx1-ubyte.gz" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and _leftovers(tmp_path, "o") == []


# --------------------------------------------------------------------------------------- image folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "imgs"
    images = {}
    for cls in ["dog", "cat"]:
        (root / cls).mkdir(parents=True)
        for i in range(3):
            px = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            (root / cls / f"{i}.png").write_bytes(_png(px))
            images[(cls, i)] = px
    (root / "cat" / "corrupt.png").write_bytes(_png(images[("cat", 0)])[:60])  # truncated PNG
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, images


def test_folder_classes_skip_corrupt_and_round_trip(folder, tmp_path):
    root, images = folder
    res = fm_in_process("prepare-data", "folder", "--root", root, "--out", tmp_path / "f", "--json", "--workers", "1")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["count"], summary["skipped"], summary["classes"]) == (6, 2, 2)
    assert "corrupt.png" in res.stderr and "notes.txt" in res.stderr
    manifest, x, y = _load(tmp_path / "f")
    assert manifest["class_names"] == ["cat", "dog"]
    order = [("cat", i) for i in range(3)] + [("dog", i) for i in range(3)]  # sorted classes, sorted files
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(x, np.stack([images[k].transpose(2, 0, 1) for k in order]))


def test_a_macos_archives_metadata_folder_is_no_class(folder, tmp_path):
    """A folder unzipped from a macOS archive holds __MACOSX/ (resource forks "._NAME", here a real image too):
    it is not a class, so "cat" and "dog" keep labels 0 and 1 and no empty class appears."""
    import shutil

    root, images = folder
    copy = tmp_path / "unzipped"
    shutil.copytree(root, copy)
    (copy / "__MACOSX" / "cat").mkdir(parents=True)
    (copy / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (copy / "__MACOSX" / "x.png").write_bytes(_png(images[("cat", 0)]))
    res = fm_in_process("prepare-data", "folder", "--root", copy, "--out", tmp_path / "f", "--json", "--workers", "1")
    assert res.returncode == 0, res.stderr
    manifest, _, y = _load(tmp_path / "f")
    assert manifest["class_names"] == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert "__MACOSX" not in res.stderr


def test_folder_parallel_workers_equal_serial(folder, tmp_path):
    root, _ = folder
    prepare("folder", tmp_path / "w1", root=root, size=16, workers=1)
    prepare("folder", tmp_path / "w2", root=root, size=16, workers=2)
    assert np.array_equal(np.load(tmp_path / "w1" / "x.npy"), np.load(tmp_path / "w2" / "x.npy"))
    assert np.load(tmp_path / "w2" / "x.npy").shape == (6, 3, 16, 16)


def test_flat_folder_is_unconditional_with_alpha_on_white_and_crop(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent: must become white
    Image.fromarray(rgba).save(root / "a.png")
    wide = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(wide).save(root / "b.png")
    summary = prepare("folder", tmp_path / "o", root=root, size=32)
    manifest, x, y = _load(tmp_path / "o")
    assert summary.count == 2 and y is None and manifest["num_classes"] == 0
    assert (x[0] == 255).all()
    # center crop then resize, done independently with plain PIL calls; fm resamples from a box, so its
    # filter also sees the real neighbours just outside the crop: equal away from the cropped edges.
    ref = np.asarray(Image.fromarray(wide).crop((8, 0, 56, 48)).resize((32, 32), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert np.array_equal(x[1][:, :, 3:-3], ref[:, :, 3:-3])


def test_a_colour_key_transparency_is_composited_on_white_like_alpha(tmp_path):
    # PNG's tRNS chunk on an RGB or grey image marks one colour transparent, as a palette entry or an alpha of 0 does.
    root = tmp_path / "keyed"
    root.mkdir()
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:4] = (200, 100, 50)
    rgb[4:] = (10, 20, 30)  # the transparent colour
    Image.fromarray(rgb).save(root / "a.png", transparency=(10, 20, 30))
    grey = np.full((8, 8), 90, dtype=np.uint8)
    grey[:, :4] = 7  # the transparent grey
    Image.fromarray(grey).save(root / "b.png", transparency=7)
    prepare("folder", tmp_path / "o", root=root, size=8)
    x = np.load(tmp_path / "o" / "x.npy")
    expected_a = np.where((rgb == (10, 20, 30)).all(-1, keepdims=True), 255, rgb).transpose(2, 0, 1)
    expected_b = np.repeat(np.where(grey == 7, 255, grey)[None], 3, axis=0)
    assert np.array_equal(x[0], expected_a) and np.array_equal(x[1], expected_b)


def test_exif_orientation_is_applied(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    px = np.zeros((16, 32, 3), dtype=np.uint8)
    px[:, :16] = 255  # left half white: a landscape picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(px).save(root / "p.png", exif=exif.tobytes())
    prepare("folder", tmp_path / "o", root=root, size=16)
    x = np.load(tmp_path / "o" / "x.npy")[0]
    upright = np.rot90(px, k=-1)  # shown upright: 32 tall, 16 wide, white on top
    assert np.array_equal(x, upright[8:24].transpose(2, 0, 1))


def test_16bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (mode I;16) holds 0..65535; PIL's convert clips it at 255, which turned all but
    the darkest 0.4% of its range white. Scaled to 8 bits instead, as an 8-bit save of the same image."""
    root = tmp_path / "scans"
    root.mkdir()
    deep = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0, 257, ... 65535
    Image.fromarray(deep).save(root / "a.png")
    assert Image.open(root / "a.png").mode.startswith("I")
    prepare("folder", tmp_path / "o", root=root, size=16)
    x = np.load(tmp_path / "o" / "x.npy")[0]
    expected = np.arange(256, dtype=np.uint8).reshape(16, 16)  # deep // 257
    assert x.shape == (3, 16, 16) and all(np.array_equal(x[c], expected) for c in range(3))


def test_resize_center_crop_of_odd_box_matches_pil_crop():
    img = Image.fromarray(RNG.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = resize_center_crop(img, 30)
    assert np.array_equal(np.asarray(out), np.asarray(img.crop((10, 0, 40, 30))))


def test_folder_out_inside_its_root_is_refused_before_any_work(folder, tmp_path):
    """--out inside --root: the dataset would be a new "class" folder (of manifest.json, x.npy, y.npy) that the
    next `fm prepare-data folder` of that root reads as one more class with no usable image. Refused, nothing
    written into the user's folder."""
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(folder[0], root)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    for out in (root / "prepared", root / "cat" / "prepared", tmp_path / "imgs" / ".." / "imgs" / "p"):
        with pytest.raises(UsageError, match="inside --root"):
            prepare("folder", out, root=root, size=16, workers=1)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before and not list(root.glob(".*"))
    res = run_fm("prepare-data", "folder", "--root", root, "--out", root / "prepared")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "inside --root" in res.stderr, res.stderr
    summary = prepare("folder", tmp_path / "beside", root=root, size=16, workers=1)  # beside it: as before
    assert (summary.count, summary.classes) == (6, 2)


def test_a_class_folder_without_a_usable_image_is_named_on_stderr(folder, tmp_path):
    """An empty class folder (or one of damaged files only, e.g. macOS's __MACOSX of ._* files) still becomes a label,
    one the model is trained to draw without a single image of it: the command says which, on stderr only."""
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(folder[0], root)
    (root / "bird").mkdir()  # sorted between cat and dog: label 1
    (root / "emu").mkdir()
    (root / "emu" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only a damaged file
    res = run_fm("prepare-data", "folder", "--root", root, "--out", tmp_path / "o", "--json", "--workers", "1")
    assert res.returncode == 0, res.stderr
    manifest, _, y = _load(tmp_path / "o")
    assert manifest["class_names"] == ["bird", "cat", "dog", "emu"]
    assert sorted(set(range(4)) - set(y.tolist())) == [0, 3]  # the reference: labels no row has
    warning = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 of 4 classes" in warning[0] and "'bird'" in warning[0] and "'emu'" in warning[0], res.stderr
    assert "'cat'" not in warning[0] and set(json.loads(res.stdout)) == {"path", "source", "count", "skipped", "classes", "seconds", "bytes"}
    quiet = run_fm("prepare-data", "folder", "--root", folder[0], "--out", tmp_path / "o2", "--workers", "1")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "all-corrupt", "file-not-dir"])
def test_folder_bad_inputs_exit_2_without_output(tmp_path, case):
    root = tmp_path / "in"
    if case == "empty":
        root.mkdir()
    elif case == "all-corrupt":
        root.mkdir()
        (root / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    elif case == "file-not-dir":
        root.write_text("x")
    if case == "missing":  # through the CLI once: exit 2 and a single line
        res = fm_in_process("prepare-data", "folder", "--root", root, "--out", tmp_path / "out")
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    else:
        with pytest.raises(UsageError):
            prepare("folder", tmp_path / "out", root=root)
    assert _leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------------------------ captions and tar


def test_captions_jsonl_relative_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    pixels = [RNG.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(3)]
    lines = []
    for i, px in enumerate(pixels):
        (tmp_path / "pics" / f"{i}.png").write_bytes(_png(px))
        lines.append(json.dumps({"image": f"pics/{i}.png", "caption": f"picture number {i} é"}))
    lines.insert(1, json.dumps({"image": "pics/missing.png", "caption": "gone"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    summary = prepare("captions", tmp_path / "o", root=tmp_path / "data.jsonl", size=24)
    manifest, x, y = _load(tmp_path / "o")
    assert (summary.count, summary.skipped) == (3, 1) and y is None
    assert read_captions(tmp_path / "o") == [f"picture number {i} é" for i in range(3)]
    assert np.array_equal(x, np.stack([p.transpose(2, 0, 1) for p in pixels]))


def test_captions_folder_pairs(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    px = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    (root / "a.png").write_bytes(_png(px))
    (root / "a.txt").write_text("a red thing\n")
    (root / "b.png").write_bytes(_png(px))  # no caption: skipped and counted
    summary = prepare("captions", tmp_path / "o", root=root, size=16)
    assert (summary.count, summary.skipped) == (1, 1) and "no caption" in summary.skipped_examples[0]
    assert read_captions(tmp_path / "o") == ["a red thing"]


def test_captions_with_unicode_line_separators_or_a_lone_surrogate_load_as_written(tmp_path):
    # Scraped captions hold U+2028, U+0085 (cp1252's ellipsis read as latin-1) and lone surrogates (an emoji's
    # escaped pair cut in half): each row must come back as itself (the surrogate as U+FFFD, which UTF-8 can hold).
    captions = ["one\u2028two", "caf\x85 end", "cut \ud83d emoji", "plain"]
    lines = []
    for i, caption in enumerate(captions):
        (tmp_path / f"{i}.png").write_bytes(_png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption}))  # ensure_ascii: a valid jsonl file
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    res = fm_in_process("prepare-data", "captions", "--root", tmp_path / "d.jsonl", "--out", tmp_path / "o", "--size", 8, "--workers", 1)
    assert res.returncode == 0, res.stderr
    expected = ["one\u2028two", "caf\x85 end", "cut \ufffd emoji", "plain"]
    assert read_captions(tmp_path / "o") == expected
    assert PreparedDataset(tmp_path / "o", text=True).__getitems__([0, 1, 2, 3])["caption"] == expected


@pytest.mark.parametrize("line", ['{"i": 1, "text": "renamed key"}', "not json", '["a", "list"]', '{"i": 1, "caption": 7}'])
def test_an_edited_captions_file_is_refused_before_use(shapes16, tmp_path, line):
    import shutil

    from fmcli.data.dataset import validate_prepared

    data = tmp_path / "d"
    shutil.copytree(shapes16, data)
    rows = (data / "captions.jsonl").read_text().split("\n")
    rows[1] = line
    (data / "captions.jsonl").write_text("\n".join(rows))
    with pytest.raises(UsageError, match="captions.jsonl line 2 is not a caption row"):
        validate_prepared(data)
    with pytest.raises(UsageError, match="line 2"):
        read_captions(data)


@pytest.mark.parametrize("content", [b"[1, 2]", b"null", b"\xff\xfe{}"])
def test_a_manifest_that_is_not_a_json_object_is_a_usage_error(shapes16, tmp_path, content):
    import shutil

    from fmcli.data.dataset import validate_prepared

    data = tmp_path / "d"
    shutil.copytree(shapes16, data)
    (data / "manifest.json").write_bytes(content)
    with pytest.raises(UsageError, match="manifest.json is not"):
        validate_prepared(data)


@pytest.mark.parametrize("kind", [["pixels"], {"pixels": 1}, None, 3])
def test_a_manifest_kind_that_is_not_a_name_is_a_usage_error(shapes16, tmp_path, kind):
    """A hand-edited `kind` that is a JSON list or object was looked up as a dict key: TypeError ("unhashable type"),
    which the CLI printed as an unexplained error. It is a manifest that is not fm's: one line naming the field."""
    import shutil

    from fmcli.data.dataset import validate_prepared

    data = tmp_path / "d"
    shutil.copytree(shapes16, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "kind": kind}))
    with pytest.raises(UsageError, match=r"manifest.json: kind .* is not a prepared dataset"):
        validate_prepared(data)


@pytest.mark.parametrize("names", ["circle", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], {"0": "circle"}])
def test_class_names_that_are_not_names_are_refused_before_training(shapes16, tmp_path, names):
    # Every checkpoint records them, and sampling refuses a checkpoint whose class names are not strings.
    import shutil

    from fmcli.data.dataset import validate_prepared

    data = tmp_path / "d"
    shutil.copytree(shapes16, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "class_names": names}))
    with pytest.raises(UsageError, match="class_names"):
        validate_prepared(data)
    (data / "manifest.json").write_text(json.dumps({**manifest, "class_names": None}))
    assert validate_prepared(data)["class_names"] is None


def test_a_byte_order_mark_is_not_part_of_a_caption(tmp_path):
    # Windows editors start UTF-8 text with U+FEFF: a jsonl file so saved was refused, a caption file kept it as text.
    px = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.png").write_bytes(_png(px))
    (tmp_path / "pairs" / "a.txt").write_bytes(b"\xef\xbb\xbfa red square\r\n")
    prepare("captions", tmp_path / "o1", root=tmp_path / "pairs", size=8)
    assert read_captions(tmp_path / "o1") == ["a red square"]
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "pairs/a.png", "caption": "a red square"}).encode() + b"\n")
    prepare("captions", tmp_path / "o2", root=tmp_path / "d.jsonl", size=8)
    assert read_captions(tmp_path / "o2") == ["a red square"]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        _add(tar, "a.png", _png(px))
        _add(tar, "a.txt", b"\xef\xbb\xbfa red square")
    prepare("tar", tmp_path / "o3", root=str(tmp_path / "s.tar"), size=8)
    assert read_captions(tmp_path / "o3") == ["a red square"]


def test_a_jsonl_file_with_raw_unicode_line_separators_in_its_captions_is_read_line_by_line(tmp_path):
    # json.dumps(..., ensure_ascii=False) writes U+2028 and U+0085 raw: still one JSON object per "\n"-ended line.
    (tmp_path / "a.png").write_bytes(_png(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    captions = ["two\u2028lines", "next\x85line"]
    text = "".join(json.dumps({"image": "a.png", "caption": c}, ensure_ascii=False) + "\r\n" for c in captions)
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8", newline="")
    summary = prepare("captions", tmp_path / "o", root=tmp_path / "d.jsonl", size=8)
    assert summary.count == 2 and read_captions(tmp_path / "o") == captions


def test_captions_bad_jsonl_exit_2(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    res = fm_in_process("prepare-data", "captions", "--root", tmp_path / "d.jsonl", "--out", tmp_path / "o")
    assert res.returncode == 2 and "line 2" in res.stderr
    assert _leftovers(tmp_path, "o") == []


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_shards_with_corrupt_member(tmp_path):
    pixels = [RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(3)]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        _add(tar, "s/k0.png", _png(pixels[0]))
        _add(tar, "s/k0.txt", b"first")
        _add(tar, "s/k1.jpg", b"\xff\xd8\xff\xe0 truncated jpeg")
        _add(tar, "s/k1.txt", b"broken")
        _add(tar, "s/k2.json", json.dumps({"caption": "second"}).encode())
        _add(tar, "s/k2.png", _png(pixels[1]))
    with tarfile.open(tmp_path / "shard-001.tar", "w") as tar:
        _add(tar, "k3.webp.png", _png(pixels[2]))  # the key is up to the first dot: "k3"
        _add(tar, "k3.txt", b"third")
    res = fm_in_process("prepare-data", "tar", "--root", str(tmp_path / "shard-*.tar"), "--size", "20", "--out", tmp_path / "o", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert (summary["count"], summary["skipped"]) == (3, 1) and "k1" in res.stderr
    _, x, _ = _load(tmp_path / "o")
    assert read_captions(tmp_path / "o") == ["first", "second", "third"]
    assert np.array_equal(x, np.stack([p.transpose(2, 0, 1) for p in pixels]))


def test_a_compressed_tar_shard_whose_damage_decodes_fails_its_crc(tmp_path):
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        for i in range(4):
            _add(tar, f"k{i}.png", _png(np.full((8, 8, 3), i, dtype=np.uint8)))
            _add(tar, f"k{i}.txt", np.random.default_rng(i).integers(0, 256, 3000, dtype=np.uint8).tobytes())  # stored as is
    raw = bytearray((tmp_path / "s.tar.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    with pytest.raises(gzip.BadGzipFile, match="CRC"):
        gzip.decompress(bytes(raw))
    (tmp_path / "s.tar.gz").write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="CRC check failed"):
        prepare("tar", tmp_path / "o", root=str(tmp_path / "s.tar.gz"), size=8)


@pytest.mark.parametrize("damage", ["cut inside a header", "a damaged header"])
def test_a_truncated_or_damaged_tar_shard_is_refused_not_silently_shortened(tmp_path, damage):
    # tarfile stops at such a header as at the archive's end: the samples after it were dropped without a word.
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for i in range(6):
            _add(tar, f"k{i}.png", _png(np.full((8, 8, 3), i, dtype=np.uint8)))
            _add(tar, f"k{i}.txt", f"caption {i}".encode())
    raw = bytearray((tmp_path / "whole.tar").read_bytes())
    with tarfile.open(tmp_path / "whole.tar") as tar:
        header = tar.getmember("k3.png").offset  # the 7th member's header, by tar's own index
    if damage == "cut inside a header":
        raw = raw[: header + 100]  # an interrupted download
    else:
        raw[header + 148 : header + 156] = b"9999999\0"  # the header's checksum field, wrong
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s.tar").write_bytes(bytes(raw))
    res = fm_in_process("prepare-data", "tar", "--root", str(tmp_path / "shards" / "*.tar"), "--size", 8, "--out", tmp_path / "o")
    assert res.returncode == 2 and "s.tar is truncated or damaged after its first 6 members" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "o").exists()
    summary = prepare("tar", tmp_path / "w", root=str(tmp_path / "whole.tar"), size=8)  # the whole shard: all 6
    assert summary.count == 6 and read_captions(tmp_path / "w") == [f"caption {i}" for i in range(6)]


def test_tar_no_match_and_not_a_tar_exit_2(tmp_path):
    res = fm_in_process("prepare-data", "tar", "--root", str(tmp_path / "nothing-*.tar"), "--out", tmp_path / "o")
    assert res.returncode == 2 and "no tar shards" in res.stderr
    (tmp_path / "fake.tar").write_bytes(b"definitely not a tar file" * 40)
    with pytest.raises(UsageError, match="not a readable tar"):
        prepare("tar", tmp_path / "o", root=str(tmp_path / "fake.tar"))
    assert _leftovers(tmp_path, "o") == []


# ------------------------------------------------------------------------ shapes, output, interruption


def test_shapes_deterministic_per_seed_and_limit(tmp_path):
    a = prepare("shapes", tmp_path / "a", count=40, seed=3, size=16)
    prepare("shapes", tmp_path / "b", count=40, seed=3, size=16)
    prepare("shapes", tmp_path / "c", count=40, seed=4, size=16)
    prepare_shapes(tmp_path / "d", count=40, seed=3, size=16)
    xa, xb, xc, xd = (np.load(tmp_path / n / "x.npy") for n in "abcd")
    assert a.count == 40 and np.array_equal(xa, xb) and np.array_equal(xa, xd) and not np.array_equal(xa, xc)
    assert read_captions(tmp_path / "a") == read_captions(tmp_path / "d")
    limited = prepare("shapes", tmp_path / "e", count=40, seed=3, size=16, limit=7)
    assert limited.count == 7 and np.array_equal(np.load(tmp_path / "e" / "x.npy"), xa[:7])
    assert read_manifest(tmp_path / "e")["count"] == 7 and len(read_captions(tmp_path / "e")) == 7


@pytest.mark.parametrize("source", ["shapes", "folder"])
def test_split_test_of_a_source_without_splits_is_refused(tmp_path, source):
    """`--split test` on a source without splits was ignored: the "test" dataset held the training images
    themselves (train/test leakage in `fm eval --data`). Refused (exit 2) before anything is written."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    reads = ("--count", 4) if source == "shapes" else ("--root", root)  # no option the source ignores (refused on its own)
    res = fm_in_process("prepare-data", source, *reads, "--out", tmp_path / "test", "--size", 8, "--split", "test")
    assert res.returncode == 2 and "has no test split" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "test").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_existing_output_refused_unless_force(tmp_path):
    out = tmp_path / "o"
    prepare("shapes", out, count=8)
    res = fm_in_process("prepare-data", "shapes", "--count", "9", "--out", out)
    assert res.returncode == 2 and "--force" in res.stderr and read_manifest(out)["count"] == 8
    prepare("shapes", out, count=9, force=True)
    assert read_manifest(out)["count"] == 9 and _leftovers(tmp_path, "o") == ["o"]
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="not a prepared dataset"):
        prepare("shapes", precious, count=9, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_force_never_deletes_the_users_files_inside_a_prepared_dataset(tmp_path):
    # The images being prepared kept inside the dataset folder they replace: --force would have deleted them with it.
    out = tmp_path / "ds"
    prepare("shapes", out, count=4, size=8)
    raw = out / "raw" / "cat"
    raw.mkdir(parents=True)
    image = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (raw / "a.png").write_bytes(_png(image))
    (out / "notes.txt").write_text("mine")
    res = fm_in_process("prepare-data", "folder", "--root", out / "raw", "--out", out, "--size", 8, "--force")
    assert res.returncode == 2 and "notes.txt, raw" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert (raw / "a.png").read_bytes() == _png(image) and (out / "notes.txt").read_text() == "mine"
    assert read_manifest(out)["source"] == "shapes"
    (out / "notes.txt").unlink()
    (out / "fm-classifier-s0.pt").write_bytes(b"fm's own cache")  # classifier.default_classifier_path: fm's, replaced
    (tmp_path / "raw").mkdir()
    (out / "raw").rename(tmp_path / "raw" / "raw")
    prepare("folder", out, root=tmp_path / "raw", size=8, force=True)  # a dataset's own files only: replaced
    assert read_manifest(out)["source"] == "folder" and sorted(p.name for p in out.iterdir()) == ["manifest.json", "x.npy", "y.npy"]


def test_out_dot_is_the_current_folder_by_its_name(tmp_path):
    # `--out .` has no name to put a temporary sibling beside (it failed with "ValueError: ... has an empty name").
    here = tmp_path / "here"
    here.mkdir()
    res = fm_in_process("prepare-data", "shapes", "--out", ".", "--size", 8, "--count", 3, cwd=here)
    assert res.returncode == 2 and "already exists" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    res = fm_in_process("prepare-data", "shapes", "--out", ".", "--size", 8, "--count", 3, "--force", "--json", cwd=here)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["path"] == str(here) and read_manifest(here)["count"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_early_stop_joins_the_pool_without_terminate(tmp_path, monkeypatch):
    # Regression: leaving the decode pool early (--limit, Ctrl-C) through Pool.terminate() can deadlock
    # (a worker blocked writing a large result holds the result queue's lock; seen in ~1 run of 3
    # under load). prepare() must let the bounded in-flight work finish and close + join instead.
    import multiprocessing.pool

    def no_terminate(self):
        raise AssertionError("Pool.terminate() called")

    monkeypatch.setattr(multiprocessing.pool.Pool, "terminate", no_terminate)
    root = tmp_path / "many"
    root.mkdir()
    for i in range(700):
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
    summary = prepare("folder", tmp_path / "o", root=root, size=8, limit=5, workers=2)
    assert summary.count == 5 and len(np.load(tmp_path / "o" / "x.npy")) == 5


def test_interrupt_mid_write_leaves_nothing(tmp_path, folder, monkeypatch):
    seen = []

    def ctrl_c(n):
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr("fmcli.data.prepare.PROGRESS_EVERY", 1)
    with pytest.raises(KeyboardInterrupt):
        prepare("folder", tmp_path / "o", root=folder[0], workers=2, on_progress=ctrl_c)
    assert _leftovers(tmp_path, "o") == []
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare("shapes", tmp_path / "o", count=50, on_progress=ctrl_c)
    assert len(seen) == 3 and _leftovers(tmp_path, "o") == []


# ----------------------------------------------------------------------------- writer and the reader


def test_writer_latents_extras_and_dtype_checks(tmp_path):
    lat = RNG.standard_normal((5, 4, 8, 8)).astype(np.float32)
    feat = RNG.standard_normal((5, 6, 3)).astype(np.float16)  # any per-row extra (not text.npy: a text cache is four files)
    with PreparedWriter(tmp_path / "l", None, (4, 8, 8), dtype="float16", kind="latents", captions=True, extras={"feat": ((6, 3), "float16")}) as w:
        w.add_batch(lat[:3], captions=["a", "b", "c"], feat=feat[:3])
        w.add(lat[3], caption="d", feat=feat[3])
        w.add(lat[4], caption="e", feat=feat[4])
        w.finish()
    x = np.load(tmp_path / "l" / "x.npy", mmap_mode="r")
    assert x.dtype == np.float16 and np.array_equal(x, lat.astype(np.float16))
    assert np.array_equal(np.load(tmp_path / "l" / "feat.npy"), feat)
    ds = PreparedDataset(tmp_path / "l")
    assert torch.equal(ds.__getitems__([4, 1])["x"], torch.from_numpy(lat[[4, 1]].astype(np.float16)).float())
    with PreparedWriter(tmp_path / "u", 2, (1, 2, 2)) as w:
        with pytest.raises(TypeError):
            w.add(np.full((1, 2, 2), 0.5))  # floats silently cast to uint8 pixels would corrupt data
        w.add(np.zeros((1, 2, 2), np.uint8))
        w.add(np.zeros((1, 2, 2), np.uint8))
        with pytest.raises(RuntimeError, match="capacity"):
            w.add(np.zeros((1, 2, 2), np.uint8))


def _fingerprint_from_files(path: Path) -> str:
    """docs/architecture.md section 5's fingerprint, recomputed from the files on disk by hand: SHA-256 of sorted JSON
    {row array file: "DTYPE [SHAPE] SHA256(data bytes)", captions.jsonl: SHA256(its bytes)}."""
    import hashlib

    parts = {}
    for name in ("x.npy", "x0.npy", "x1.npy", "x_flip.npy", "y.npy"):
        if (path / name).is_file():
            a = np.load(path / name)
            parts[name] = f"{a.dtype.str} {list(a.shape)} {hashlib.sha256(a.tobytes()).hexdigest()}"
    if (path / "captions.jsonl").is_file():
        parts["captions.jsonl"] = hashlib.sha256((path / "captions.jsonl").read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def test_the_manifest_fingerprint_is_the_contents_not_the_path(tmp_path):
    """A resume compares the manifest's `fingerprint` with its checkpoint's: the files' contents, so another seed's
    images of the same count differ, a copy elsewhere or the same images re-prepared are equal; a reflow pairs and a
    mirrored latent dataset (row files x0/x1, x_flip) get one too; a malformed one is refused before use."""
    import shutil

    from fmcli.data.dataset import validate_prepared

    a = prepare_shapes(tmp_path / "a", size=8, count=6, seed=0)
    b = prepare_shapes(tmp_path / "b", size=8, count=6, seed=1)
    again = prepare_shapes(tmp_path / "again", size=8, count=6, seed=0)
    copy = Path(shutil.copytree(a, tmp_path / "elsewhere" / "copy"))
    fp = {d.name: read_manifest(d)["fingerprint"] for d in (a, b, again)}
    assert fp["a"] == _fingerprint_from_files(a) == _fingerprint_from_files(copy) == fp["again"]
    assert fp["b"] == _fingerprint_from_files(b) != fp["a"]
    pairs = {"x1": RNG.standard_normal((3, 1, 2, 2)), "x0": RNG.standard_normal((3, 1, 2, 2))}
    with PreparedWriter(tmp_path / "p", 3, (1, 2, 2), dtype="float32", kind="pairs", labels=True, x_name="x1", extras={"x0": ((1, 2, 2), "float32")}) as w:
        w.add_batch(pairs["x1"], np.array([0, 1, 0]), x0=pairs["x0"])
        w.finish(num_classes=2)
    with PreparedWriter(tmp_path / "l", 2, (1, 2, 2), dtype="float16", kind="latents", extras={"x_flip": ((1, 2, 2), "float16")}) as w:
        w.add_batch(RNG.standard_normal((2, 1, 2, 2)), x_flip=RNG.standard_normal((2, 1, 2, 2)))
        w.finish(mirrored=True)
    for d in (tmp_path / "p", tmp_path / "l"):
        assert validate_prepared(d)["fingerprint"] == _fingerprint_from_files(d)
    manifest = read_manifest(copy)
    for bad in (fp["a"].upper(), fp["a"][:-1], 7, ["x"]):
        (copy / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": bad}))
        with pytest.raises(UsageError, match="fingerprint .* is not a SHA-256"):
            validate_prepared(copy)


def test_dataset_pickles_without_data_and_loader_workers_agree(shapes16):
    ds = PreparedDataset(shapes16)
    first = ds.__getitems__([0, 5])
    assert len(pickle.dumps(ds)) < 4096 < np.load(shapes16 / "x.npy", mmap_mode="r").nbytes
    x = np.load(shapes16 / "x.npy")
    assert torch.allclose(first["x"], torch.from_numpy(x[[0, 5]]).float() / 127.5 - 1, atol=0)
    assert first["x"].min() >= -1 and first["x"].max() <= 1
    batches = [list(range(k, 512, 37))[:16] for k in range(6)]

    def load(workers):
        dl = DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=lambda b: b)
        return [(b["x"], b["y"]) for b in dl]

    for (xa, ya), (xb, yb), idx in zip(load(0), load(2), batches):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya, torch.from_numpy(np.load(shapes16 / "y.npy")[idx]))


def test_train_remakes_auto_prepared_shapes_from_an_older_generator(tmp_path, monkeypatch):
    from fmcli.launch import default_data
    from fmcli.config import load_config
    from fmcli.data.shapes import GENERATOR_VERSION

    monkeypatch.chdir(tmp_path)
    cfg = load_config("debug", ["data.count=64"])
    path = tmp_path / default_data(cfg, prepare=True).data.path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION
    fresh = np.load(path / "x.npy").copy()
    # Pretend the directory came from the previous generator: altered pixels, no version recorded.
    np.save(path / "x.npy", np.zeros_like(fresh))
    del manifest["generator_version"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    default_data(cfg, prepare=True)
    assert json.loads((path / "manifest.json").read_text())["generator_version"] == GENERATOR_VERSION
    assert np.array_equal(np.load(path / "x.npy"), fresh)
    # A current directory is reused as it is, not prepared again.
    stamp = (path / "x.npy").stat().st_mtime_ns
    default_data(cfg, prepare=True)
    assert (path / "x.npy").stat().st_mtime_ns == stamp


def test_auto_prepared_shapes_follow_data_seed_not_train_seed(tmp_path, monkeypatch):
    from fmcli.launch import default_data
    from fmcli.config import load_config

    def prepare(where, *sets):
        where.mkdir()
        monkeypatch.chdir(where)
        path = where / default_data(load_config("debug", ["data.count=32", *sets]), prepare=True).data.path
        return path.relative_to(where), np.load(path / "x.npy"), np.load(path / "y.npy")

    default, reseeded, other_data = prepare(tmp_path / "a"), prepare(tmp_path / "b", "train.seed=7"), prepare(tmp_path / "c", "data.seed=7")
    assert default[0] == reseeded[0] == Path("data/shapes-16-n32-s0")  # quickstart's data/shapes-32-n20000-s0 keeps its name
    assert np.array_equal(default[1], reseeded[1]) and np.array_equal(default[2], reseeded[2])
    assert other_data[0] == Path("data/shapes-16-n32-s7") and not np.array_equal(default[1], other_data[1])


def test_sklearn_digits_source_has_disjoint_fixed_splits(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from fmcli.data.prepare import prepare
    from fmcli.data.readers import open_sklearn_digits

    train, test = open_sklearn_digits("train"), open_sklearn_digits("test")
    names = {s: [r.name for r in src.records()] for s, src in (("train", train), ("test", test))}
    assert (len(names["train"]), len(names["test"])) == (1438, 359)
    assert not set(names["train"]) & set(names["test"]) and len(set(names["train"]) | set(names["test"])) == 1797
    summary = prepare("sklearn-digits", tmp_path / "digits", split="test", size=16)
    x, y = np.load(tmp_path / "digits" / "x.npy"), np.load(tmp_path / "digits" / "y.npy")
    digits = load_digits()
    assert summary.count == 359 and x.shape == (359, 1, 16, 16) and x.dtype == np.uint8
    assert np.array_equal(y, digits.target[4::5]) and sorted(set(y.tolist())) == list(range(10))
    # Upscaling keeps the picture: the 16px image block-averaged to 8x8 correlates with the 0..16 original.
    small = x[:, 0].reshape(359, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.corrcoef(small.ravel(), digits.images[4::5].ravel())[0, 1] > 0.95


def test_sigterm_during_prepare_data_leaves_nothing(tmp_path):
    # SIGTERM runs the same clean-up as Ctrl-C: no hidden temporary folder, no half-written dataset.
    import signal
    import subprocess
    import sys
    import time

    from conftest import fm_env

    out = tmp_path / "big"
    proc = subprocess.Popen([sys.executable, "-m", "fmcli.cli", "prepare-data", "shapes", "--out", str(out), "--count", "2000000", "--size", "32"],
                            env=fm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".") for p in tmp_path.iterdir()):
        time.sleep(0.1)  # the temporary folder appears once the work has begun
    assert any(p.name.startswith(".") for p in tmp_path.iterdir()), "prepare-data never started writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == [] and "terminated" in err


def test_a_large_jpeg_is_shrunk_by_lanczos_not_only_by_the_decoders_dct_scaling(tmp_path):
    """A 1,024-pixel JPEG prepared at 128: the decoder may shrink it by its DCT scaling (fast), but only down to
    twice the size, so Lanczos does the rest. Reference: the full decode resized with Lanczos by PIL itself.
    Decoding straight at 128 (the DCT's 1/8, no Lanczos) was off by ~1 grey level on average here."""
    from PIL import Image

    from fmcli.data.decode import open_image, resize_center_crop

    yy, xx = np.mgrid[0:1024, 0:1024] / 1024
    img = np.stack([128 + 100 * np.sin(6 * xx + 3 * yy), 128 + 100 * np.cos(5 * yy), 128 + 80 * np.sin(9 * xx * yy)], -1)
    img[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.05] = [250, 30, 30]
    img[np.abs(xx - 0.2) < 0.05] = [10, 10, 240]
    img += np.random.default_rng(0).normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    reference = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS), dtype=float)
    pixels = np.asarray(resize_center_crop(open_image(buf.getvalue(), 128, 3), 128), dtype=float)
    assert np.abs(pixels - reference).mean() < 0.75


@pytest.mark.parametrize("edit", ["swap", "shift", "bool_index"])
def test_captions_out_of_order_with_the_images_are_refused(tmp_path, edit):
    """Captions are matched to images by position; an edited captions.jsonl whose rows were moved (two swapped, or
    the first dropped and the last repeated: the count still right) paired images with other images' captions,
    silently. Row k must say "i": k. Reference: each image's caption names its own pixel value."""
    from fmcli.data.dataset import validate_prepared

    with PreparedWriter(tmp_path / "d", 6, (1, 2, 2), captions=True) as w:
        for k in range(6):
            w.add(np.full((1, 2, 2), 10 * k, np.uint8), caption=f"grey {10 * k}")
        data = w.finish()
    batch = PreparedDataset(data, text=True).__getitems__([4, 0, 5, 2])
    for x, caption in zip(batch["x"], batch["caption"]):
        assert caption == f"grey {round((float(x[0, 0, 0]) + 1) * 127.5)}"
    rows = (data / "captions.jsonl").read_text().splitlines()
    if edit == "swap":
        rows[1], rows[2] = rows[2], rows[1]
    elif edit == "shift":
        rows = rows[1:] + rows[-1:]
    else:
        rows[1] = json.dumps({"i": True, "caption": "grey 10"})
    (data / "captions.jsonl").write_text("\n".join(rows) + "\n")
    expected_line = 1 if edit == "shift" else 2
    with pytest.raises(UsageError, match=f"captions.jsonl line {expected_line} is the caption of image .*, expected {expected_line - 1}"):
        validate_prepared(data)
    with pytest.raises(UsageError, match="out of order"):
        read_captions(data)


@pytest.mark.parametrize("space", ["latent", ["latents"], None, "pixels", "latents", "absent"])
def test_reflow_pairs_must_say_pixels_or_latents(tmp_path, space):
    """`space` says what a pairs dataset's x1 holds, which decides whether sample grids (and the student's checkpoint)
    decode through a VAE; an edited one ("latent") trained and recorded kind "latent" in the checkpoint, silently."""
    from fmcli.data.dataset import data_space, validate_prepared

    x = np.zeros((4, 1, 2, 2), np.float32)
    with PreparedWriter(tmp_path / "p", 4, (1, 2, 2), dtype="float32", kind="pairs", x_name="x1", extras={"x0": ((1, 2, 2), "float32")}) as w:
        w.add_batch(x, x0=x)
        data = w.finish(**({} if space == "absent" else {"space": space}))
    if space in ("pixels", "latents", "absent"):
        assert data_space(validate_prepared(data)) == ("pixels" if space == "absent" else space)
    else:
        with pytest.raises(UsageError, match=r"manifest.json: space .* is not what reflow pairs hold \(pixels or latents\)"):
            validate_prepared(data)


@pytest.mark.parametrize("field, value", [("shape", ["3", "16", "16"]), ("shape", [3.0, 16, 16]), ("count", "512"), ("count", 512.0),
                                          ("count", True), ("num_classes", 10.7), ("num_classes", "10"), ("shape", "3x16x16")])
def test_manifest_sizes_that_are_not_json_integers_are_refused(shapes16, tmp_path, field, value):
    """count, shape and num_classes are used as read (model.image_size, in_channels, num_classes): an edited
    `"shape": ["3", "16", "16"]` passed validation (int() accepted it) and failed deep in setup as "TypeError: not
    all arguments converted during string formatting"; 10.7 classes trained as 10. One line, exit 2."""
    import shutil

    from fmcli.data.dataset import validate_prepared

    data = tmp_path / "d"
    shutil.copytree(shapes16, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    with pytest.raises(UsageError, match="must be whole numbers"):
        validate_prepared(data)
    res = fm_in_process("train", "--preset", "debug", "--data", data, "--run-dir", tmp_path / "run", "--set", "train.steps=1")
    assert res.returncode == 2 and "must be whole numbers" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
