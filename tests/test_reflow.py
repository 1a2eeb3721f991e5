"""`fm reflow` pairs and training on them: the teacher's ODE, reproducible, chunk/world independent, restartable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import fm_in_process, run_fm
from fmcli import reflow as reflow_mod
from fmcli.checkpoint import load_checkpoint, resolve_checkpoint, save_atomic
from fmcli.config import SampleConfig, config_to_dict, load_config, overrides_with, validate_config
from fmcli.data.dataset import PreparedDataset, PreparedWriter
from fmcli.distributed import DistContext
from fmcli.errors import UsageError
from fmcli.generate import initial_noise, load_for_sampling
from fmcli.reflow import generate_pairs
from fmcli.train import train

HEUN = SampleConfig(solver="heun", steps=3, cfg=2.5)


def pairs(loaded, out, n=11, batch_size=4, seed=0, **kw):
    return generate_pairs(loaded, out, num_pairs=n, seed=seed, sample_cfg=HEUN, batch_size=batch_size, ctx=DistContext(), checkpoint="teacher", **kw)


def arrays(path):
    return {f: np.load(path / f"{f}.npy") for f in ("x0", "x1", "y")}


@pytest.fixture(scope="module")
def teacher_ckpt(debug_run, tmp_path_factory):
    """debug_run's checkpoint with every weight random: 4 steps from adaLN-Zero's init barely move the noise."""
    state = load_checkpoint(resolve_checkpoint(debug_run))
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=gen) / max(1, v.shape[-1] if v.dim() > 1 else 1) ** 0.5 for k, v in state["ema"].items()}
    path = tmp_path_factory.mktemp("teacher") / "step.pt"
    save_atomic({**state, "model": weights, "ema": weights}, path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_ckpt):
    return load_for_sampling(str(teacher_ckpt), torch.device("cpu"))


def test_pairs_are_the_teachers_guided_heun_solutions(teacher, tmp_path):
    summary = pairs(teacher, tmp_path / "p")
    got = arrays(tmp_path / "p")
    k, null = teacher.num_classes, teacher.num_classes
    np.testing.assert_array_equal(got["y"], np.arange(11) % k)
    x0 = torch.from_numpy(got["x0"])
    assert abs(x0.mean()) < 0.05 and abs(x0.std() - 1) < 0.05
    assert not torch.equal(x0[:1], initial_noise(0, [0], teacher.shape))  # its own stream, not fm sample's noise
    # An independent Heun with CFG, one pair at a time: v = v_u + w (v_c - v_u), t from 0 to 1 in 3 steps.
    model = teacher.model
    for i in range(11):
        x = x0[i : i + 1].double()

        def v(x, t):
            both = model(torch.cat([x, x]).float(), torch.full((2,), t), torch.tensor([i % k, null])).double()
            return both[1:] + HEUN.cfg * (both[:1] - both[1:])

        with torch.no_grad():
            for a, b in ((0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0)):
                k1 = v(x, a)
                k2 = v(x + (b - a) * k1, b)
                x = x + (b - a) / 2 * (k1 + k2)
        np.testing.assert_allclose(got["x1"][i], x[0].float().numpy(), atol=2e-5)
    assert summary.nfe == 6 and summary.count == 11 and summary.chunks_solved == 3
    assert np.abs(got["x1"] - got["x0"]).mean() > 0.1  # the teacher moved them


def test_reproducible_for_a_seed_and_independent_of_batch_size(teacher, tmp_path):
    pairs(teacher, tmp_path / "a", batch_size=4)
    pairs(teacher, tmp_path / "b", batch_size=5)
    pairs(teacher, tmp_path / "c", batch_size=4, seed=1)
    a, b, c = arrays(tmp_path / "a"), arrays(tmp_path / "b"), arrays(tmp_path / "c")
    np.testing.assert_array_equal(a["x0"], b["x0"])
    np.testing.assert_array_equal(a["y"], b["y"])
    np.testing.assert_allclose(a["x1"], b["x1"], rtol=1e-5, atol=1e-5)  # float rounding of other GEMM shapes only
    assert not np.allclose(a["x0"], c["x0"])


def test_two_processes_write_the_same_dataset_as_one(teacher_ckpt, tmp_path):
    args = ["reflow", "--ckpt", teacher_ckpt, "-n", "9", "--solver", "heun", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    one = fm_in_process(*args, "--out", tmp_path / "one")
    two = run_fm(*args, "--out", tmp_path / "two", "--nproc", "2", "--json", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["count"] == 9
    for f, ref in arrays(tmp_path / "one").items():
        np.testing.assert_array_equal(np.load(tmp_path / "two" / f"{f}.npy"), ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no .partial or .tmp left


def interrupt_chunk_at(monkeypatch, first_index: int, error):
    """Make the chunk that starts at pair `first_index` raise `error` (a kill mid-run); returns the real solver."""
    real = reflow_mod._solve_chunk

    def failing(loaded, indices, *args):
        if indices[0] == first_index:
            raise error
        return real(loaded, indices, *args)

    monkeypatch.setattr(reflow_mod, "_solve_chunk", failing)
    return real


def test_an_interrupted_reflow_continues_without_recomputing_or_duplicating(teacher, tmp_path, monkeypatch):
    pairs(teacher, tmp_path / "straight")
    real, calls = reflow_mod._solve_chunk, []

    class Killed(Exception):
        pass

    def failing(*args):
        calls.append(args[1][0])
        if calls == [0, 4]:  # the second chunk of the first attempt dies
            raise Killed
        return real(*args)

    monkeypatch.setattr(reflow_mod, "_solve_chunk", failing)
    with pytest.raises(Killed):
        pairs(teacher, tmp_path / "out")
    assert not (tmp_path / "out").exists() and len(list((tmp_path / "out.partial").glob("part-*.npz"))) == 1
    with pytest.raises(UsageError, match="other settings"):
        pairs(teacher, tmp_path / "out", seed=5)
    calls.clear()
    advanced = []  # the progress bar's advances: its total is every pair (rank_share), the reused chunk's too
    summary = pairs(teacher, tmp_path / "out", on_chunk=advanced.append)
    assert calls == [4, 8] and summary.chunks_reused == 1 and summary.chunks_solved == 2
    assert sum(advanced) == 11 == reflow_mod.rank_share(11, 4, DistContext())
    for f, ref in arrays(tmp_path / "straight").items():
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{f}.npy"), ref)
    assert not (tmp_path / "out.partial").exists()


def test_nfe_is_the_mean_per_pair_and_nfe_max_the_most_as_every_sampling_command_reports(teacher, tmp_path, monkeypatch):
    """dopri5 picks its steps per chunk: `nfe` is the mean over the pairs of the network forwards counted
    here (a CFG [cond; uncond] forward counts once), `nfe_max` the most any chunk's pairs took."""
    forwards, per_chunk = [0], []
    model_forward, solve_chunk = teacher.model.forward, reflow_mod._solve_chunk

    def counting_forward(*args, **kwargs):
        forwards[0] += 1
        return model_forward(*args, **kwargs)

    def counting_chunk(loaded, indices, *args):
        before = forwards[0]
        result = solve_chunk(loaded, indices, *args)
        per_chunk.append((forwards[0] - before, len(indices)))
        return result

    monkeypatch.setattr(teacher.model, "forward", counting_forward)
    monkeypatch.setattr(reflow_mod, "_solve_chunk", counting_chunk)
    dopri5 = SampleConfig(solver="dopri5", cfg=2.0, rtol=1e-3, atol=1e-3)
    summary = generate_pairs(teacher, tmp_path / "p", num_pairs=5, seed=0, sample_cfg=dopri5, batch_size=2, ctx=DistContext(), checkpoint="teacher")
    counts = [n for n, _ in per_chunk]
    assert len(set(counts)) > 1  # the chunks differ: a mean and a maximum that tell the two meanings apart
    mean = sum(n * k for n, k in per_chunk) / 5
    assert summary.nfe == pytest.approx(mean) and summary.nfe_max == max(counts)
    teacher_record = json.loads((tmp_path / "p" / "manifest.json").read_text())["teacher"]
    assert teacher_record["nfe"] == pytest.approx(mean) and teacher_record["nfe_max"] == max(counts)


def test_pairs_round_trip_through_the_reader(teacher, tmp_path):
    pairs(teacher, tmp_path / "p")
    raw = arrays(tmp_path / "p")
    ds = PreparedDataset(tmp_path / "p")
    assert len(ds) == 11 and ds.manifest["kind"] == "pairs" and ds.manifest["space"] == "pixels"
    assert ds.manifest["teacher"]["solver"] == "heun" and ds.manifest["teacher"]["cfg"] == 2.5
    batch = ds.__getitems__([3, 0, 10])
    np.testing.assert_array_equal(batch["x"].numpy(), raw["x1"][[3, 0, 10]])  # stored floats, not rescaled
    np.testing.assert_array_equal(batch["x0"].numpy(), raw["x0"][[3, 0, 10]])
    np.testing.assert_array_equal(batch["y"].numpy(), raw["y"][[3, 0, 10]])


def text_checkpoint(path, encoder=None, text_dim=8, data_info=None):
    cfg = load_config("debug", ["model.cross_attention=true", f"model.text_dim={text_dim}", "model.image_size=16", "model.in_channels=3",
                                "model.num_classes=0", f"encoders.text_encoder='{encoder}'", "encoders.max_tokens=8"])
    from fmcli.models import build_model

    sd = build_model(cfg.model).state_dict()
    save_atomic({"model": sd, "ema": sd, "config": config_to_dict(cfg), "step": 1, "data_info": data_info or {}}, path)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(debug_run, tmp_path):
    text_checkpoint(tmp_path / "text.pt")
    no_prompts = fm_in_process("reflow", "--ckpt", tmp_path / "text.pt", "-n", "4", "--out", tmp_path / "p")
    assert no_prompts.returncode == 2 and no_prompts.stderr.count("\n") == 1 and "--prompt" in no_prompts.stderr
    (tmp_path / "taken").mkdir()
    exists = fm_in_process("reflow", "--ckpt", debug_run, "-n", "4", "--out", tmp_path / "taken")
    assert exists.returncode == 2 and exists.stderr.count("\n") == 1 and "--force" in exists.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "text.pt"] and not any((tmp_path / "taken").iterdir())


def test_out_under_a_file_is_refused_before_any_work(debug_run, tmp_path, capsys):
    """--out whose folder is a file: exit 2 with one line before the teacher is loaded, not exit 1 with a
    NotADirectoryError once OUT.partial is made."""
    from fmcli.cli import app

    (tmp_path / "afile").write_text("a file where the pairs' folder would go\n")
    with pytest.raises(SystemExit) as exit_info:
        app(args=["reflow", "--ckpt", str(debug_run), "-n", "4", "--steps", "2", "--out", str(tmp_path / "afile" / "pairs")], prog_name="fm")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_text_teacher_pairs_carry_their_prompts(tmp_path):
    from fmcli.encoders import build_tiny_text_encoder

    words = ["a", "red", "blue", "circle", "star"]
    encoder = build_tiny_text_encoder(tmp_path / "t5", seed=0, words=words, d_model=16, layers=1, heads=2)
    text_checkpoint(tmp_path / "text.pt", encoder, text_dim=16)
    loaded = load_for_sampling(str(tmp_path / "text.pt"), torch.device("cpu"))
    prompts = ["a red circle", "a blue star", "a star"]
    pairs(loaded, tmp_path / "p", n=7, batch_size=3, prompts=prompts)
    ds = PreparedDataset(tmp_path / "p", text=True)
    assert ds.manifest["num_classes"] == 0 and not ds.has_labels
    assert ds.__getitems__(list(range(7)))["caption"] == [prompts[i % 3] for i in range(7)]
    assert ds.manifest["teacher"]["prompts_sha256"]  # the prompts are part of the plan a restart must match


def test_an_interrupted_text_reflow_refuses_another_text_encoder(tmp_path, monkeypatch):
    """Another encoder of the same kind and width (t5-small and flan-t5-small, say) passes every encoder check
    but encodes the prompts otherwise: continuing with it would mix two conditionings in one dataset."""
    from fmcli.encoders import build_tiny_text_encoder

    words = ["a", "red", "blue", "circle", "star"]
    first, other = (build_tiny_text_encoder(tmp_path / name, seed=seed, words=words, d_model=16, layers=1, heads=2) for name, seed in (("t5", 0), ("t5b", 1)))
    text_checkpoint(tmp_path / "text.pt", first, text_dim=16)
    loaded = {e: load_for_sampling(str(tmp_path / "text.pt"), torch.device("cpu"), text_encoder=str(e)) for e in (first, other)}
    prompts = ["a red circle", "a blue star"]
    assert not torch.allclose(*(loaded[e].text.encode(prompts)[0] for e in (first, other)))  # another conditioning
    real = interrupt_chunk_at(monkeypatch, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        pairs(loaded[first], tmp_path / "p", n=6, batch_size=3, prompts=prompts)
    monkeypatch.setattr(reflow_mod, "_solve_chunk", real)
    with pytest.raises(UsageError, match=r"other settings \(text_encoder\).*--text-encoder"):
        pairs(loaded[other], tmp_path / "p", n=6, batch_size=3, prompts=prompts)
    # A plan.json written before the field existed continues (its encoder is not known, so not compared).
    plan_file = tmp_path / "p.partial" / "plan.json"
    plan_file.write_text(json.dumps({k: v for k, v in json.loads(plan_file.read_text()).items() if k != "text_encoder"}))
    summary = pairs(loaded[first], tmp_path / "p", n=6, batch_size=3, prompts=prompts)
    assert summary.chunks_reused == 1 and PreparedDataset(tmp_path / "p").manifest["teacher"]["text_encoder"] == str(first.resolve())


def test_text_pairs_record_the_encoder_that_ran_for_the_student(tmp_path, monkeypatch):
    """A teacher trained on cached text states of an encoder that has since moved, sampled with --text-encoder DIR:
    the pairs' manifest recorded the teacher's old encoder (its gone path, `cached: true`, though the pairs hold
    captions, no text states), so a student trained on them looked for that gone encoder. It records the one that
    encoded the prompts, by its absolute path, and the student's training finds that one."""
    from fmcli.encoders import build_tiny_text_encoder, setup_training_encoders

    words = ["a", "red", "blue", "circle", "star"]
    encoder = build_tiny_text_encoder(tmp_path / "t5", seed=0, words=words, d_model=16, layers=1, heads=2)
    gone = {"path": str(tmp_path / "moved-away"), "model_type": "t5", "hidden_size": 16, "max_tokens": 8, "cached": True}
    text_checkpoint(tmp_path / "text.pt", tmp_path / "moved-away", text_dim=16, data_info={"kind": "pixels", "text_encoder": gone})
    monkeypatch.chdir(tmp_path)
    loaded = load_for_sampling(str(tmp_path / "text.pt"), torch.device("cpu"), text_encoder="t5")  # relative, as typed
    pairs(loaded, tmp_path / "p", n=4, batch_size=2, prompts=["a red circle", "a blue star"])
    recorded = PreparedDataset(tmp_path / "p").manifest["text_encoder"]
    assert recorded["path"] == os.path.join(str(tmp_path), "t5") and not recorded.get("cached"), recorded
    student = load_config("debug", ["model.cross_attention=true", "model.image_size=16", "model.num_classes=0", "flow.coupling=pairs"])
    _, resolved = setup_training_encoders(student, PreparedDataset(tmp_path / "p", text=True), torch.device("cpu"))
    assert resolved.encoders.text_encoder == str(encoder.resolve())


def test_an_autoguidance_teacher_is_refused_with_advice_reflow_can_follow(tmp_path):
    """A checkpoint of an older fm whose config samples with sample.guidance='auto': reflow said to pass --guide-ckpt,
    which it does not have, so no command could make its pairs. Now one line (exit 2, nothing written) that says
    --cfg W; with it the pairs are those of the same teacher with sample.guidance='cfg' at W."""
    from fmcli.models import build_model

    cfg = load_config("debug", ["model.image_size=16", "model.in_channels=3", "model.num_classes=4"])
    sd = build_model(cfg.model).state_dict()
    for name, guidance in (("auto.pt", "auto"), ("cfg.pt", "cfg")):
        raw = config_to_dict(cfg)
        raw["sample"].update(guidance=guidance, cfg=2.0)
        save_atomic({"model": sd, "ema": sd, "config": raw, "step": 1, "data_info": {}}, tmp_path / name)
    run = ["-n", "4", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    refused = fm_in_process("reflow", "--ckpt", tmp_path / "auto.pt", "--out", tmp_path / "p", *run)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--cfg W" in refused.stderr and "--guide-ckpt" not in refused.stderr, refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.pt", "cfg.pt"]
    for name in ("auto", "cfg"):
        done = fm_in_process("reflow", "--ckpt", tmp_path / f"{name}.pt", "--out", tmp_path / f"p-{name}", "--cfg", "2", *run)
        assert done.returncode == 0, done.stderr
    for field in ("x0", "x1"):
        np.testing.assert_array_equal(np.load(tmp_path / "p-auto" / f"{field}.npy"), np.load(tmp_path / "p-cfg" / f"{field}.npy"))


# ------------------------------------------------------------------------------------ training on pairs


def identity_pairs(path, n=64):
    """Pairs with x1 = x0: with sigma_min = 0 the target velocity is exactly 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 16, 16), dtype=np.float32)
    with PreparedWriter(path, n, (3, 16, 16), dtype="float32", kind="pairs", labels=True, x_name="x1", extras={"x0": ((3, 16, 16), "float32")}) as w:
        w.add_batch(x, np.arange(n) % 4, x0=x)
        return w.finish(num_classes=4, space="pixels")


def test_pairs_coupling_trains_on_the_stored_noise(tmp_path):
    data = identity_pairs(tmp_path / "pairs")
    cfg = load_config("debug", [f"data.path='{data}'", "flow.coupling='pairs'", "flow.sigma_min=0.0", "train.steps=1", "train.checkpoint_every=0"])
    # The untrained DiT outputs 0 (adaLN-Zero), and the stored pairs ask for 0: fresh noise would give loss ~ 2.
    assert train(cfg, tmp_path / "run").losses == [0.0]
    with pytest.raises(UsageError, match="flow.coupling=pairs"):
        train(load_config("debug", [f"data.path='{data}'"]), tmp_path / "other")
    with pytest.raises(UsageError, match="data.flip"):
        train(cfg.with_section("data", flip=True), tmp_path / "flip")


def test_pairs_training_resumes_bit_exactly_and_starts_from_the_teacher(teacher, teacher_ckpt, tmp_path):
    pairs(teacher, tmp_path / "p", n=32, batch_size=16)
    common = [f"data.path='{tmp_path / 'p'}'", "flow.coupling='pairs'", f"train.init_from='{teacher_ckpt}'", "train.steps=6",
              "train.global_batch_size=8", "train.micro_batch_size=4", "train.log_every=1", "train.checkpoint_every=0", "train.ema_decay=0.9"]
    straight = train(load_config("debug", common), tmp_path / "straight")
    first = train(load_config("debug", common), tmp_path / "split", stop_at_step=3)
    ckpt = resolve_checkpoint(tmp_path / "split")
    second = train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "split", resume_from=ckpt)
    assert straight.losses == first.losses + second.losses  # bit for bit
    a, b = (load_checkpoint(resolve_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # init_from: one step at a negligible learning rate leaves the teacher's EMA weights.
    tiny = train(load_config("debug", overrides_with(common, ["train.steps=1", "optim.lr=1e-12"])), tmp_path / "init")
    got = load_checkpoint(tiny.checkpoint)["model"]
    for k, v in teacher.model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-9, rtol=0)
    with pytest.raises(UsageError, match="init_from"):
        train(load_config("debug", [*common, "model.depth=3"]), tmp_path / "mismatch")


def test_init_from_refuses_weights_that_fit_but_compute_another_network(teacher_ckpt, shapes16, tmp_path):
    """model.heads and model.prediction change no weight's shape, so the teacher's weights load into a model that
    differs in them, and compute another function there: init_from refuses it (one line naming the setting)."""
    from fmcli.models import build_model

    state = load_checkpoint(teacher_ckpt)
    model_cfg = validate_config(state["config"]).model
    x, t, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    reference, other = build_model(model_cfg), build_model(model_cfg.model_copy(update={"heads": 2 * model_cfg.heads}))
    reference.load_state_dict(state["ema"])
    other.load_state_dict(state["ema"])  # the same shapes: it loads without a word
    with torch.no_grad():
        assert (other(x, t, y) - reference(x, t, y)).abs().max() > 1e-3  # but it is another network
    common = [f"data.path='{shapes16}'", f"train.init_from='{teacher_ckpt}'", "train.steps=1", "train.checkpoint_every=0"]
    for setting, said in ((f"model.heads={2 * model_cfg.heads}", f"model.heads {model_cfg.heads} in the checkpoint, {2 * model_cfg.heads} here"),
                          ("model.prediction='data'", "model.prediction velocity in the checkpoint, data here")):
        with pytest.raises(UsageError, match=said) as refused:
            train(load_config("debug", [*common, setting]), tmp_path / "run")
        assert "\n" not in str(refused.value)


def test_straightness_benchmark_against_closed_forms():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("reflow_straightness", REPO / "benchmarks" / "reflow_straightness.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert bench.path_straightness(lambda x, t: a, torch.zeros_like(a), 8) == pytest.approx(0.0, abs=1e-24)  # a straight path
    # v = 2 t a: x1 - x0 = a, S = mean(a^2) * integral of (2t - 1)^2 dt = mean(a^2) / 3 (Euler: to O(1/steps)).
    s = bench.path_straightness(lambda x, t: 2 * t * a, torch.zeros_like(a), 2000)
    assert s == pytest.approx((a**2).mean().item() / 3, rel=2e-3)


def test_one_step_distillation_trains_at_t0_only(tmp_path, monkeypatch):
    import fmcli.step as step_mod
    from fmcli.flow import sample_times

    assert torch.equal(sample_times(5, "zero", shift=3.0), torch.zeros(5))  # no shift moves t = 0
    seen, real = [], step_mod.interpolate
    monkeypatch.setattr(step_mod, "interpolate", lambda x0, x1, t, s: seen.append(t) or real(x0, x1, t, s))
    data = identity_pairs(tmp_path / "pairs")
    cfg = load_config("debug", [f"data.path='{data}'", "flow.coupling='pairs'", "flow.time_sampler='zero'", "train.steps=2", "train.checkpoint_every=0"])
    train(cfg, tmp_path / "run")
    assert len(seen) == 2 and all(torch.equal(t, torch.zeros(16)) for t in seen)


def test_a_restart_at_another_precision_is_refused(teacher, tmp_path, monkeypatch):
    """Pairs are solved at the resolved sampling precision, which the plan records: an interrupted fp32 reflow
    does not continue in bf16 (its pairs would mix two precisions), and continues at fp32."""
    from fmcli.generate import prepare_for_sampling

    fp32 = prepare_for_sampling(teacher, HEUN.model_copy(update={"precision": "fp32", "compile": False}), torch.device("cpu"))
    bf16 = prepare_for_sampling(teacher, HEUN.model_copy(update={"precision": "bf16", "compile": False}), torch.device("cpu"))
    real = interrupt_chunk_at(monkeypatch, 4, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        pairs(fp32, tmp_path / "out")
    assert json.loads((tmp_path / "out.partial" / "plan.json").read_text())["precision"] == "fp32"
    with pytest.raises(UsageError, match=r"other settings \(precision\)"):
        pairs(bf16, tmp_path / "out")
    monkeypatch.setattr(reflow_mod, "_solve_chunk", real)
    summary = pairs(fp32, tmp_path / "out")
    assert summary.chunks_reused == 1 and summary.chunks_solved == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["teacher"]["precision"] == "fp32" and manifest["teacher"]["compile"] is False
    pairs(bf16, tmp_path / "bf16")
    a, b = arrays(tmp_path / "out"), arrays(tmp_path / "bf16")
    np.testing.assert_array_equal(a["x0"], b["x0"])
    assert 0 < np.abs(a["x1"] - b["x1"]).max() < 0.1  # bf16 pairs: the same flow, rounded differently


def test_an_unconditional_teacher_records_the_guidance_that_ran(tmp_path, capsys):
    """An unconditional teacher has no branch for cfg to guide away from, so it samples unguided: its pairs and
    the manifest's teacher record say cfg 1 (what ran), as `fm sample`'s summary does, not the cfg asked for."""
    from fmcli.cli import app

    with PreparedWriter(tmp_path / "data", 8, (3, 16, 16), labels=False) as w:
        for img in np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8):
            w.add(img, None)
        w.finish(num_classes=0, class_names=None, source="test")
    cfg = load_config("debug", [f"data.path='{tmp_path / 'data'}'", "train.steps=2", "train.checkpoint_every=0", "train.global_batch_size=4"])
    train(cfg, tmp_path / "run")
    for name, w in (("guided", "3"), ("plain", "1")):
        with pytest.raises(SystemExit) as exit_info:
            app(args=["reflow", "--ckpt", str(tmp_path / "run"), "-n", "3", "--steps", "2", "--cfg", w, "--out", str(tmp_path / name), "--json"], prog_name="fm")
        assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert "has nothing to guide" in capsys.readouterr().err  # the note fm sample gives
    teacher = json.loads((tmp_path / "guided" / "manifest.json").read_text())["teacher"]
    assert teacher["cfg"] == 1.0
    np.testing.assert_array_equal(np.load(tmp_path / "guided" / "x1.npy"), np.load(tmp_path / "plain" / "x1.npy"))


def test_json_row_and_manifest_record_the_settings_that_ran(teacher_ckpt, tmp_path):
    """`fm reflow --json` carries what every sampling command's row does (solver, steps or rtol/atol, cfg,
    guidance and its interval, seed, precision, compile), and the manifest's teacher record names the guidance
    too; dopri5 chooses its own steps, so neither says 50 (the fixed-step default)."""
    state = load_checkpoint(teacher_ckpt)
    state["config"]["sample"].update(cfg=2.0, guidance="cfg", guidance_interval=[0.2, 0.9])  # the teacher's own guidance
    ckpt = tmp_path / "teacher.pt"
    save_atomic(state, ckpt)
    result = fm_in_process("reflow", "--ckpt", ckpt, "-n", 3, "--solver", "dopri5", "--rtol", "0.01", "--atol", "0.02", "--seed", 3,
                           "--out", tmp_path / "p", "--device", "cpu", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    expected = {"solver": "dopri5", "steps": None, "rtol": 0.01, "atol": 0.02, "cfg": 2.0, "guidance": "cfg", "guidance_interval": [0.2, 0.9]}
    assert {k: row.get(k) for k in expected} == expected and row["seed"] == 3 and row["precision"] == "fp32" and row["compile"] is False
    assert row["count"] == 3 and row["path"] == str(tmp_path / "p")
    assert "settings" not in row  # inline, one flat row as every sampling command's (not also nested)
    teacher = PreparedDataset(tmp_path / "p").manifest["teacher"]
    assert {k: teacher.get(k) for k in expected} == expected and teacher["seed"] == 3 and teacher["num_pairs"] == 3


def test_reflow_out_dot_is_refused_before_sampling_and_leaves_nothing(tmp_path, debug_run):
    """`fm reflow --out .` names the current folder: an existing one is refused before any sampling (as any
    existing --out), and no OUT.partial of finished chunks is left inside it; with --force it is the dataset."""
    here = tmp_path / "pairs"
    here.mkdir()
    refused = fm_in_process("reflow", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--out", ".", cwd=here)
    assert refused.returncode == 2 and "already exists" in refused.stderr, refused.stderr
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
    made = fm_in_process("reflow", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--out", ".", "--force", cwd=here)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "pairs" / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
