"""Presets and --set overrides: typed, validated, unknown keys and bad values rejected (exit 2 via the CLI)."""

import functools
import json
import re

import pytest

from conftest import fm_in_process, run_fm
from fmcli.config import RESUME_SAFE_KEYS, Config, apply_overrides, config_to_dict, load_config, parse_override, preset_names, validate_config
from fmcli.errors import UsageError


def test_overrides_are_typed():
    assert parse_override("train.steps=200") == ("train.steps", 200)
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("train.compile=true") == ("train.compile", True)
    assert parse_override("optim.name=muon") == ("optim.name", "muon")
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim.betas", [0.9, 0.95])
    cfg = load_config("debug", ["train.steps=7", "optim.betas=[0.9, 0.95]"])
    assert cfg.train.steps == 7 and cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stepz=5", "stepz"),
        ("nosuch.steps=5", "nosuch"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=-1", "train.steps"),
        ("optim.name=sgd", "optim.name"),
        ("model.heads=5", "heads"),
    ],
)
def test_bad_overrides_are_rejected_with_the_key_named(override, needle):
    with pytest.raises(UsageError, match=needle):
        load_config("debug", [override])


def test_unknown_key_in_a_preset_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 10\nbogus = 1\n")
    with pytest.raises(UsageError, match="train.bogus"):
        load_config(str(bad))


def test_a_binary_file_given_as_a_preset_is_one_usage_line(tmp_path):
    """A PNG (not UTF-8, so not TOML) passed as --preset: exit 2 naming the file, not exit 1 with a UnicodeDecodeError."""
    image = tmp_path / "picture.toml"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(UnicodeDecodeError):
        image.read_text(encoding="utf-8")  # the premise: the file is not UTF-8 text
    bad = fm_in_process("train", "--preset", image, "--print-config")
    assert bad.returncode == 2 and bad.stdout == "", bad
    assert len(bad.stderr.strip().splitlines()) == 1 and "picture.toml" in bad.stderr and "UnicodeDecodeError" not in bad.stderr
    base = tmp_path / "child.toml"  # the same file reached as a base
    base.write_text('base = "picture.toml"\n')
    assert fm_in_process("train", "--preset", base, "--print-config").returncode == 2


def test_an_unknown_key_on_resume_is_called_unknown_not_a_change():
    """`fm resume --set train.stepz=3` is a typo: the message names the unknown setting, not "cannot change when
    resuming (it would change the run's math)", which says the key exists."""
    cfg = load_config("debug")
    assert "stepz" not in Config.model_fields["train"].annotation.model_fields  # the premise: no such setting
    for typo, part in (("train.stepz=3", "stepz"), ("trian.steps=3", "trian"), ("train.steps.x=3", "x")):
        with pytest.raises(UsageError, match=f"unknown setting '{part}'") as err:
            apply_overrides(cfg, [typo], allowed=RESUME_SAFE_KEYS)
        assert "cannot change" not in str(err.value)
    with pytest.raises(UsageError, match="cannot change when resuming"):  # a real key outside the safe ones still is
        apply_overrides(cfg, ["model.hidden_size=64"], allowed=RESUME_SAFE_KEYS)


def test_a_text_setting_given_a_number_by_set_keeps_the_text():
    """`--set name=2024` (a run named by its date) parsed 2024 as a TOML integer and was refused with "name: Input
    should be a valid string"; a text field takes the characters typed, while typed fields still parse."""
    from pathlib import Path

    from fmcli.launch import training_config

    cfg = load_config("debug", ["name=2024", "data.path=007", "train.init_from=1e3", "eval.classifier=true", "train.steps=3"])
    assert (cfg.name, cfg.data.path, cfg.train.init_from, cfg.eval.classifier) == ("2024", "007", "1e3", "true")
    assert cfg.train.steps == 3 and load_config("debug", ["name='x y'", "data.path=null"]).name == "x y"
    assert training_config("debug", ["name=2024"], data=None, run_dir=None, resume=None)[1] == Path("runs") / "2024"



def test_a_text_setting_given_a_toml_date_or_time_by_set_keeps_the_text():
    """`--set name=2024-06-01` (a run named by its date) parsed as a TOML date and was refused with "name: Input
    should be a valid string", as numbers once were: a text field takes the characters typed, whatever TOML reads."""
    import tomllib

    typed = {"name": "2024-06-01", "data.path": "12:30:00", "train.init_from": "1979-05-27T07:32:00Z", "eval.ref": "[1, 2]"}
    assert all(not isinstance(tomllib.loads(f"v = {t}")["v"], str) for t in typed.values())  # the premise: TOML types them
    cfg = load_config("debug", [f"{k}={v}" for k, v in typed.items()])
    assert (cfg.name, cfg.data.path, cfg.train.init_from, cfg.eval.ref) == tuple(typed.values())

def test_every_preset_validates():
    assert {"quickstart", "debug"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_resume_refuses_unsafe_overrides():
    cfg = load_config("debug")
    assert apply_overrides(cfg, ["train.steps=99"], allowed=RESUME_SAFE_KEYS).train.steps == 99
    # The evaluation's weight files may move between sessions, as eval.inception's and the encoders' may.
    moved = apply_overrides(cfg, ["eval.classifier='/new/clf.pt'", "eval.dinov2='/new/dinov2'"], allowed=RESUME_SAFE_KEYS)
    assert (moved.eval.classifier, moved.eval.dinov2) == ("/new/clf.pt", "/new/dinov2")
    with pytest.raises(UsageError, match="optim.lr"):
        apply_overrides(cfg, ["optim.lr=1.0"], allowed=RESUME_SAFE_KEYS)


def test_cli_print_config_and_exit_codes():
    ok = run_fm("train", "--preset", "debug", "--set", "train.steps=3", "--print-config")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["train"]["steps"] == 3
    for args in (["--set", "train.bogus=1"], ["--set", "train.steps=abc"], ["--preset", "nope"]):
        bad = fm_in_process("train", "--preset", "debug", *args, "--print-config") if args[0] != "--preset" else fm_in_process("train", *args, "--print-config")
        assert bad.returncode == 2, bad
        assert bad.stdout == ""
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_version_and_usage_errors():
    v = run_fm("--version")
    assert v.returncode == 0 and v.stdout.startswith("fm ")
    assert run_fm("sample").returncode == 2  # missing --ckpt
    assert run_fm("nosuchcommand").returncode == 2


def test_ot_coupling_is_refused_for_text_models():
    with pytest.raises(UsageError, match="coupling"):
        load_config("debug", ["model.cross_attention=true", "flow.coupling=ot-exact"])


def test_a_directory_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    from fmcli.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # e.g. a run directory made with --run-dir quickstart
    assert load_config("quickstart").name == "quickstart"


def test_auto_shift_is_sd3s_resolution_rule_resolved_from_the_data(tmp_path):
    from fmcli.config import AUTO_SHIFT_REFERENCE_DIM, resolve, resolve_without_data

    cfg = load_config("debug", ["flow.shift=auto"])
    assert cfg.flow.shift == "auto"
    for shape, want in [([3, 32, 32], (3 * 32 * 32 / 784) ** 0.5), ([1, 28, 28], 1.0), ([4, 8, 8], 1.0), ([3, 64, 64], (3 * 64 * 64 / 784) ** 0.5)]:
        got = resolve(cfg, {"shape": shape, "num_classes": 10})
        assert got.flow.shift == pytest.approx(want, abs=1e-4) and got.sample.shift == got.flow.shift  # the grid follows
    assert AUTO_SHIFT_REFERENCE_DIM == 784
    assert resolve_without_data(load_config("quickstart", ["flow.shift=auto"])).flow.shift == pytest.approx(3072**0.5 / 28, abs=1e-4)
    # Without data, from the source's known shape and from model dims set by hand: the sampling grid follows too
    # (bench and autotune time the grid the run would sample on).
    for sets in [[], ["model.image_size=32", "model.in_channels=3", "model.num_classes=10"]]:
        got = resolve_without_data(load_config("quickstart", ["flow.shift=auto", *sets]))
        assert got.flow.shift == pytest.approx(3072**0.5 / 28, abs=1e-4) and got.sample.shift == got.flow.shift
    # A number is kept as given; a sample.shift the user set is kept.
    assert resolve(load_config("debug", ["flow.shift=1.5"]), {"shape": [3, 32, 32]}).flow.shift == 1.5
    assert resolve(load_config("debug", ["flow.shift=auto", "sample.shift=1"]), {"shape": [3, 32, 32]}).sample.shift == 1.0


@pytest.mark.parametrize("value", ["0", "-1", "bogus", "true", "inf", "nan"])
def test_bad_shift_values_are_one_clear_error(value):
    with pytest.raises(UsageError, match=r'flow.shift: .*finite number'):
        load_config("debug", [f"flow.shift={value}"])


def test_a_run_trained_with_auto_shift_records_the_number(tmp_path, shapes16):
    import torch

    from fmcli.train import train

    run = tmp_path / "run"
    train(load_config("debug", [f"data.path='{shapes16}'", "train.steps=1", "train.checkpoint_every=0", "flow.shift=auto"]), run)
    state = torch.load(next((run / "checkpoints").glob("step-*.pt")), weights_only=True)
    assert state["config"]["flow"]["shift"] == 1.0 == state["config"]["sample"]["shift"]  # 3x16x16 = 768 values: unshifted
    assert json.loads((run / "config.json").read_text())["flow"]["shift"] == 1.0


@pytest.mark.parametrize(
    "override, needle",
    [
        # 0 was read as None (the whole global batch per rank): a silently ignored setting
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.micro_batch_size=-4", "train.micro_batch_size"),
        # torch.optim.AdamW refuses betas outside [0, 1) only when the run builds it (exit 1, after the data)
        ("optim.betas=[1.5, 0.999]", "optim.betas"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        # the U-Net needs at least one level of positive width (IndexError / conv RuntimeError before)
        ("model.channel_mult=[]", "model.channel_mult"),
        ("model.channel_mult=[1, 0]", "model.channel_mult"),
    ],
)
def test_values_the_run_cannot_use_are_refused_with_the_key(override, needle):
    with pytest.raises(UsageError, match=needle):
        load_config("debug", [override])
    refused = fm_in_process("train", "--preset", "debug", "--set", override, "--print-config")
    assert refused.returncode == 2 and needle in refused.stderr and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1


def test_valid_micro_batch_betas_and_levels_still_load():
    cfg = load_config("debug", ["train.micro_batch_size=4", "optim.betas=[0.0, 0.95]", "model.arch=unet", "model.channel_mult=[1]"])
    assert (cfg.train.micro_batch_size, cfg.optim.betas, cfg.model.channel_mult) == (4, (0.0, 0.95), (1,))
    assert load_config("debug", ["train.micro_batch_size=auto"]).train.micro_batch_size == "auto"
    assert load_config("debug", ["train.micro_batch_size=none"]).train.micro_batch_size is None


def test_a_model_that_cannot_take_the_datas_images_is_a_usage_error_before_work(tmp_path, shapes16):
    # shapes16 holds 16x16 images: a DiT patch of 5 or a 6-level U-Net (16 / 2^5) cannot cut them; this was a
    # ValueError from the model's constructor (exit 1) once the run had resolved its data and hardware.
    for extra in (["model.patch_size=5"], ["model.arch=unet", "model.channel_mult=[1,1,1,1,1,1]"]):
        args = [a for item in extra for a in ("--set", item)]
        refused = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", *args)
        assert refused.returncode == 2, refused.stderr
        assert "image size 16 is not divisible" in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "run").exists()
    # The DiT's sin-cos positions need a width divisible by 4: refused with the config, before the data.
    with pytest.raises(UsageError, match="hidden_size 34 must be divisible by 4"):
        load_config("debug", ["model.hidden_size=34"])
    with pytest.raises(UsageError, match="not divisible by model.patch_size 5"):
        load_config("debug", ["model.patch_size=5", "model.image_size=16"])
    # An MLP ratio that rounds to no hidden unit built an empty MLP (a torch warning) and trained on.
    with pytest.raises(UsageError, match="no hidden unit"):
        load_config("debug", ["model.mlp_ratio=0.01"])
    assert load_config("debug", ["model.mlp_ratio=0.5"]).model.mlp_ratio == 0.5
    # What divides is accepted: 16 / 8, and a U-Net of 5 levels (16 / 2^4).
    assert load_config("debug", ["model.patch_size=8", "model.image_size=16"]).model.patch_size == 8
    assert load_config("debug", ["model.arch=unet", "model.channel_mult=[1,1,1,1,1]", "model.image_size=16"]).model.arch == "unet"


def test_zero_times_are_refused_for_training_without_reflow_pairs(tmp_path, shapes16):
    # t = 0 only on independent (or OT) noise learns the mean image minus the noise: every one-step sample is
    # the mean. It was accepted and trained; the documented use is one-step distillation on reflow pairs.
    from fmcli.config import check_training_config

    for coupling in ("independent", "ot-exact"):
        with pytest.raises(UsageError, match="time_sampler='zero'.*flow.coupling='pairs'"):
            check_training_config(load_config("debug", ["flow.time_sampler=zero", f"flow.coupling={coupling}"]))
    check_training_config(load_config("debug", ["flow.time_sampler=zero", "flow.coupling=pairs"]))
    refused = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", "--set", "flow.time_sampler=zero")
    assert refused.returncode == 2 and "flow.coupling='pairs'" in refused.stderr, refused.stderr
    assert not (tmp_path / "run").exists()


def test_a_stored_config_with_a_seed_new_runs_refuse_still_loads():
    """New runs refuse seeds outside [0, 2^32) (launch.training_config; tests/test_cli_bad_input.py), but a
    checkpoint trained before that check keeps loading for sample/resume/export: the range is not in the schema."""
    from fmcli.config import config_to_dict, load_config, validate_config

    for seed in (-1, 2**32, 2**40):
        raw = config_to_dict(load_config("debug"))
        raw["train"]["seed"] = seed
        assert validate_config(raw, source="old checkpoint").train.seed == seed


def _numeric_settings():
    """(dotted key, JSON-schema entry) of every setting whose schema type is a number (integer or number) and not
    also a boolean, in every section (and train.budget_fallback): the oracle is pydantic's JSON schema, not the
    annotations the validator reads."""
    from pydantic import BaseModel

    from fmcli.config import BudgetFallback

    sections = [(name, f.annotation) for name, f in Config.model_fields.items() if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)]
    for section, model in [*sections, ("train.budget_fallback", BudgetFallback)]:
        for field, schema in model.model_json_schema()["properties"].items():
            types = {s.get("type") for s in schema.get("anyOf", [schema])}
            if types & {"integer", "number", "array"} and "boolean" not in types:
                yield f"{section}.{field}", schema


def _items_of(schema: dict):
    """An array setting's item schemas (as many as it takes), or None."""
    for s in schema.get("anyOf", [schema]):
        if s.get("type") == "array":
            return s.get("prefixItems") or [s["items"]] * max(1, s.get("minItems", 1))
    return None


@pytest.mark.parametrize("literal", ["true", "false"])
def test_a_boolean_is_refused_for_every_number_setting_by_set_and_in_a_preset(literal, tmp_path):
    """pydantic's lax mode read true as 1 and false as 0: `steps = true` trained one step, `--set optim.lr=true`
    at 1.0, `channel_mult = [1, true]` built a level of width 1. Every int/float setting (and every number item of
    a tuple setting) refuses a boolean with the config error naming the key."""
    checked = 0
    for key, schema in _numeric_settings():
        items = _items_of(schema)
        if items is None:
            value = literal
        elif any(i.get("type") in ("integer", "number") for i in items):
            value = "[" + ", ".join([literal] * len(items)) + "]"
        else:
            continue  # a list of strings (budget_fallback.overrides)
        section, field = key.rsplit(".", 1)
        refused = f"{key.replace('.', '[.]')}: .*(boolean|got {literal.title()})"  # flow.shift words it itself
        if section == "train.budget_fallback":  # a fallback needs a budget; its other field valid
            sets = ["train.budget_minutes=5", "train.budget_fallback={min_steps=1, overrides=['train.steps=2']}"]
            toml = '[train]\nbudget_minutes = 5\n[train.budget_fallback]\nmin_steps = 1\noverrides = ["train.steps=2"]\n'
            toml = toml.replace(f"{field} = ", f"{field} = {value} #") if f"\n{field} = " in toml else toml + f"{field} = {value}\n"
        else:
            sets, toml = [], f"[{section}]\n{field} = {value}\n"
        with pytest.raises(UsageError, match=f"invalid config [(]debug[)]: {refused}"):
            load_config("debug", [*sets, f"{key}={value}"])
        preset = tmp_path / "p.toml"
        preset.write_text(f'base = "debug"\n{toml}')
        with pytest.raises(UsageError, match=refused):
            load_config(str(preset))
        checked += 1
    assert checked >= 50  # the premise: the schema walk found the numeric settings


def test_numbers_still_load_where_a_number_is_expected():
    """The refusal is of booleans only: an int for a float, a whole float for an int, lists for tuples, booleans
    for booleans, and every shipped preset and its saved config (config_to_dict, as checkpoints store it) load."""
    from fmcli.config import config_to_dict, validate_config

    cfg = load_config("debug", ["optim.lr=1", "sample.cfg=2", "train.steps=1e3", "train.budget_minutes=3", "optim.betas=[0, 0.9]",
                                "model.arch=unet", "model.channel_mult=[1, 2]", "data.flip=true", "train.compile=false", "sample.guidance_interval=[0, 1]"])
    assert (cfg.optim.lr, cfg.sample.cfg, cfg.train.steps, cfg.train.budget_minutes) == (1.0, 2.0, 1000, 3.0)
    assert (cfg.optim.betas, cfg.model.channel_mult, cfg.data.flip, cfg.train.compile) == ((0.0, 0.9), (1, 2), True, False)
    for name in preset_names():
        saved = load_config(name)
        assert validate_config(json.loads(json.dumps(config_to_dict(saved)))) == saved


def test_an_empty_preset_file_is_refused_naming_it(tmp_path):
    """A preset of 0 bytes or only comments (a truncated or wrong file) trained every default: a DiT-S for 1000
    steps named "run". It is now one usage line naming the file, given directly or as a base; one key is enough."""
    import tomllib

    for name, text in (("zero.toml", ""), ("comments.toml", "# my preset\n\n# [train]\n"), ("blank.toml", "\n  \n")):
        assert tomllib.loads(text) == {}  # the premise: TOML reads no setting
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=f"{name} has no settings"):
            load_config(str(tmp_path / name))
    (tmp_path / "child.toml").write_text('base = "zero.toml"\n[train]\nsteps = 3\n')
    with pytest.raises(UsageError, match="zero.toml has no settings"):
        load_config(str(tmp_path / "child.toml"))
    bad = fm_in_process("train", "--preset", tmp_path / "zero.toml", "--print-config")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1 and "zero.toml" in bad.stderr
    (tmp_path / "one.toml").write_text('name = "mine"\n')
    assert load_config(str(tmp_path / "one.toml")).name == "mine"


def test_a_key_set_twice_is_refused_naming_it_and_both_values(tmp_path, debug_run):
    """`--set train.steps=5 --set train.steps=7` trained 7 steps and dropped the 5 without a word; every command
    that takes --set (train, train --resume, resume, bench) and a preset's budget_fallback.overrides now refuse
    a key given twice (exit 2, one line naming it and both values), before any work. Distinct keys still stack."""
    twice = ["--set", "train.steps=5", "--set", " train.steps = 7"]
    before = sorted(p.name for p in (debug_run / "checkpoints").iterdir())
    for command in (["train", "--preset", "debug", "--print-config"], ["resume", debug_run], ["bench", "--preset", "debug"],
                    ["train", "--preset", "debug", "--run-dir", debug_run, "--resume", "latest"]):
        bad = fm_in_process(*command, *twice)
        assert bad.returncode == 2 and bad.stdout == "", (command, bad)
        assert bad.stderr.strip().splitlines() == ["error: --set train.steps is given twice (5 and 7): give it once"], command
    assert sorted(p.name for p in (debug_run / "checkpoints").iterdir()) == before
    with pytest.raises(UsageError, match=r"--set optim.lr is given twice \(0.5 and 0.5\)"):  # the same value twice too
        apply_overrides(load_config("debug"), ["optim.lr=0.5", "optim.lr=0.5"])
    preset = tmp_path / "p.toml"
    preset.write_text('base = "quickstart"\n[train.budget_fallback]\nmin_steps = 9\noverrides = ["model.depth=2", "optim.lr=1e-3", "model.depth=3"]\n')
    for sets in ([], ["model.depth=4"]):  # also where a --set of its key drops the fallback: checked on every run
        with pytest.raises(UsageError, match=r"budget_fallback.overrides: model.depth is given twice \(2 and 3\)"):
            load_config(str(preset), sets)
    cfg = load_config("debug", ["train.steps=5", "train.log_every=7", "model.size=DiT-S/2", "model.depth=3"])
    assert (cfg.train.steps, cfg.train.log_every, cfg.model.depth, cfg.model.hidden_size) == (5, 7, 3, 384)


def test_a_stored_config_whose_fallback_repeats_a_key_still_loads_with_the_last_value(tmp_path):
    """Runs trained before keys had to be given once kept a preset's train.budget_fallback.overrides as written in
    their checkpoints' config; repeating a key there made every later `fm sample/export/resume` of the run fail
    ("given twice"). A stored config still loads, its fallback the last value as that run knew it (train.steps 3,
    by hand); a preset or --set that repeats a key is still refused where the config is written."""
    from fmcli.config import budget_fallback_config, config_to_dict, validate_config

    stored = config_to_dict(load_config("debug", ["train.budget_minutes=5"]))
    stored["train"]["budget_fallback"] = {"min_steps": 2, "overrides": ["train.steps=2", "optim.lr=1e-3", "train.steps=3"]}
    cfg = validate_config(json.loads(json.dumps(stored)), source="step-0000004.pt")
    assert cfg.train.budget_fallback.overrides == ["train.steps=2", "optim.lr=1e-3", "train.steps=3"]
    assert (budget_fallback_config(cfg).train.steps, budget_fallback_config(cfg).optim.lr) == (3, 1e-3)
    sets = ["train.budget_minutes=5", "train.budget_fallback={min_steps=2, overrides=['train.steps=2', 'train.steps=3']}"]
    with pytest.raises(UsageError, match=r"^invalid config \(debug\): train.budget_fallback.overrides: train.steps is given twice \(2 and 3\)"):
        load_config("debug", sets)


def test_an_empty_preset_name_is_refused_not_the_defaults():
    """`fm train --preset "$PRESET"` with the variable unset passed "" and trained every default (a DiT-S for
    1000 steps named "run"); "" is now an unknown preset (exit 2), as any name that is not one."""
    with pytest.raises(UsageError, match="unknown preset ''"):
        load_config("")
    for command in ("train", "bench"):
        bad = fm_in_process(command, "--preset", "", *(["--print-config"] if command == "train" else []))
        assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1, bad


def test_data_and_set_data_path_together_are_refused(tmp_path):
    """`fm train --data A --set data.path=B` trained on A and dropped B without a word (a key given twice, once as
    its own flag); both together are now one usage line naming both, before anything is written. Each alone works."""
    from pathlib import Path

    from fmcli.launch import training_config

    a, b = tmp_path / "A", tmp_path / "B"
    bad = fm_in_process("train", "--preset", "debug", "--data", a, "--set", f"data.path={b}", "--run-dir", tmp_path / "run")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.strip().splitlines() == [f"error: --data {a} and --set data.path={b} both set data.path: give one"]
    assert sorted(tmp_path.iterdir()) == []  # nothing written
    assert training_config("debug", [], data=a, run_dir=None, resume=None)[0].data.path == str(a)
    assert training_config("debug", [f"data.path={b}"], data=None, run_dir=None, resume=None)[0].data.path == str(b)
    assert training_config("debug", ["train.seed=1"], data=Path(a), run_dir=None, resume=None)[0].data.path == str(a)
def test_resume_may_change_the_tracker_and_the_device_and_none_names_no_tracker():
    """train.tracker and train.device change where records go and where the same math runs, not the math: a
    resume may set them. `none` is train.tracker's own choice (no tracker), not null (which it does not take)."""
    cfg = load_config("debug", ["train.tracker=tensorboard", "train.device=cpu"])
    resumed = apply_overrides(cfg, ["train.tracker=none", "train.device=auto"], allowed=RESUME_SAFE_KEYS)
    assert (resumed.train.tracker, resumed.train.device) == ("none", "auto")
    assert load_config("debug", ["train.tracker=None"]).train.tracker == "none"


def test_resume_refuses_another_precision_saying_how_to_train_at_it():
    """A resumed fp16 run on a machine without CUDA is told to use bf16 or fp32, which a resume cannot set: the
    refusal names the way that exists, a new run from its weights."""
    with pytest.raises(UsageError, match=r"cannot change when resuming: .*--set train.init_from=CHECKPOINT"):
        apply_overrides(load_config("debug"), ["train.precision=fp32"], allowed=RESUME_SAFE_KEYS)


def test_a_scripts_own_settings_give_way_to_the_users_set_of_the_same_key():
    # The benchmark scripts pass their own settings and then the user's --set; load_config refuses a key twice, so a
    # user's key must replace the script's (as it did when the last value won) rather than crash the script.
    from fmcli.config import load_config, overrides_with

    items = overrides_with(["optim.lr=1e-3", "train.steps=5"], ["optim.lr = 5e-4", "model.depth=2"])
    assert items == ["train.steps=5", "optim.lr = 5e-4", "model.depth=2"]
    cfg = load_config("quickstart", items)
    assert (cfg.optim.lr, cfg.train.steps, cfg.model.depth) == (5e-4, 5, 2)


@pytest.mark.parametrize("features", ["inceptoin", "Tiny", "domain,dinov2", ":make", "mod:", "true"])
def test_an_unknown_eval_features_is_refused_when_the_config_is_read(features):
    """eval.features was any string: with eval.every = 0 or no eval.ref nothing looked at it, so a typo went into
    config.json and every checkpoint and failed only at a later resume that gave the reference. The spaces are
    inception, tiny, domain, dinov2 (docs/architecture.md section 6) or a module:factory of two non-empty parts."""
    with pytest.raises(UsageError, match=r"eval\.features: must be inception, tiny, domain, dinov2 or module:factory"):
        load_config("debug", [f"eval.features={features}"])
    for good in ("inception", "tiny", "domain", "dinov2", "mypackage.features:make"):
        assert load_config("debug", [f"eval.features={good}"]).eval.features == good
    # A resume's --set too; a stored config that holds one still loads (to be sampled, or resumed with a --set).
    stored = validate_config({**config_to_dict(load_config("debug")), "eval": {"features": features}})
    with pytest.raises(UsageError, match=r"eval\.features: must be"):
        apply_overrides(load_config("debug"), [f"eval.features={features}"], allowed=RESUME_SAFE_KEYS)
    assert apply_overrides(stored, ["eval.features=tiny"], allowed=RESUME_SAFE_KEYS).eval.features == "tiny"


def _reads(arch: str, key: str, value) -> bool:
    """Whether the network `arch` builds depends on `key` (brute force: the weights' names and shapes of a tiny model
    with the setting at another value), independent of what config.py says the architecture reads."""
    from fmcli.config import ModelConfig
    from fmcli.models import build_model

    base = dict(arch=arch, hidden_size=8, heads=2, depth=1, patch_size=4, mlp_ratio=4.0, channel_mult=(1, 2), layers_per_block=1,
                image_size=8, in_channels=3, num_classes=2)

    def weights(**change):
        return {name: tuple(p.shape) for name, p in build_model(ModelConfig(**{**base, **change})).state_dict().items()}

    return weights() != weights(**{key: value})


ARCH_SETTINGS = {"depth": 2, "patch_size": 2, "mlp_ratio": 2.0, "channel_mult": [1, 1], "layers_per_block": 2}


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_a_model_setting_the_architecture_never_reads_is_refused_where_the_user_gives_it(arch, tmp_path):
    """`--set model.depth=8` on a U-Net (or model.channel_mult on a DiT) was accepted and trained the same network
    as without it. A size setting the built network does not depend on is now a one-line error naming it, from a
    --set or the user's own preset file; every one it does depend on still loads."""
    unread = {key for key, value in ARCH_SETTINGS.items() if not _reads(arch, key, value)}
    assert unread == ({"depth", "patch_size", "mlp_ratio"} if arch == "unet" else {"channel_mult", "layers_per_block"})  # the premise
    for key, value in ARCH_SETTINGS.items():
        sets = [f"model.arch={arch}", f"model.{key}={json.dumps(value)}"]
        if key not in unread:
            assert getattr(load_config("debug", sets).model, key) == (tuple(value) if isinstance(value, list) else value)
            continue
        with pytest.raises(UsageError, match=rf"^invalid config \(--set\): model\.{key} is a .* setting that the .* \(model\.arch = '{arch}'\) never reads"):
            load_config("debug", sets)
        own = tmp_path / f"{key}.toml"
        own.write_text(f'base = "debug"\n[model]\narch = "{arch}"\n{key} = {json.dumps(value)}\n')
        with pytest.raises(UsageError, match=rf"invalid config \({own}\): model\.{key} is a"):
            load_config(str(own))


def test_switching_the_architecture_keeps_the_presets_own_size_settings_and_stored_configs_load():
    """Only a user's own value is refused: `--set model.arch=unet` on a DiT preset (its depth and patch_size are the
    preset's, not the user's) and the reverse still load; so does every shipped preset, and its saved config.json
    (which holds every field, defaults included) round-trips and takes a resume's --set."""
    assert load_config("debug", ["model.arch=unet"]).model.arch == "unet"
    assert load_config("mnist-unet", ["model.arch=dit"]).model.arch == "dit"
    for name in preset_names():
        saved = json.loads(json.dumps(config_to_dict(load_config(name))))
        stored = validate_config(saved, source="config.json")
        assert config_to_dict(stored) == saved
        assert apply_overrides(stored, ["train.steps=5", "data.num_workers=0"], allowed=RESUME_SAFE_KEYS).train.steps == 5


def test_a_user_file_over_a_shipped_preset_and_a_budget_fallback_are_checked_as_the_user_gave_them(tmp_path):
    over = tmp_path / "over.toml"  # the base's depth is the shipped preset's: switching arch in the user's file is fine
    over.write_text('base = "quickstart"\n[model]\narch = "unet"\n[optim]\nname = "adamw"\n[repa]\nencoder = "none"\n')
    assert load_config(str(over)).model.arch == "unet"
    with pytest.raises(UsageError, match=r"invalid config \(--set\): model\.mlp_ratio is a DiT setting"):
        load_config(str(over), ["model.mlp_ratio=2"])
    fallback = tmp_path / "fallback.toml"  # the fallback's items are the user's too: a depth for a U-Net falls back to the same net
    fallback.write_text('base = "mnist-unet"\n[train]\nbudget_minutes = 5\n[train.budget_fallback]\nmin_steps = 10\noverrides = ["model.depth=2"]\n')
    with pytest.raises(UsageError, match=r"invalid config \(train\.budget_fallback\.overrides\): model\.depth is a DiT setting"):
        load_config(str(fallback))
    fallback.write_text(fallback.read_text().replace("model.depth=2", "model.hidden_size=32"))
    assert load_config(str(fallback)).train.budget_fallback.overrides == ["model.hidden_size=32"]


def test_shapes_settings_beside_a_prepared_dataset_are_refused(shapes16):
    """data.image_size, count and seed only make the shapes data fm prepares itself (data.source = "shapes" and no
    data.path); beside --data (or another source) they were accepted and the run trained on the data as prepared."""
    from pathlib import Path

    from fmcli.config import resolve
    from fmcli.data.dataset import read_manifest
    from fmcli.launch import training_config

    manifest = read_manifest(shapes16)  # the premise: the model takes the prepared data's own size, whatever data.image_size says
    assert resolve(validate_config({"data": {"path": str(shapes16), "image_size": 32}}), manifest).model.image_size == manifest["shape"][-1] == 16
    for item in ("data.image_size=32", "data.count=8", "data.seed=3"):
        key = item.split("=")[0].replace(".", r"\.")
        with pytest.raises(UsageError, match=rf"invalid config \(--set\): {key} only sets up the shapes data .*data\.path {shapes16}"):
            training_config("debug", [item], data=Path(shapes16), run_dir=None, resume=None)
        with pytest.raises(UsageError, match=rf"{key} only sets up .*data\.source = 'mnist' comes from `fm prepare-data mnist`"):
            load_config("mnist-unet", [item])
        assert load_config("debug", [item]).data.path is None  # the shapes data fm prepares: read
    refused = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--set", "data.image_size=32", "--print-config")
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1
    assert training_config("debug", [], data=Path(shapes16), run_dir=None, resume=None)[0].data.image_size == 16  # the preset's, unread: fine


# A setting: (another value, the --set items that make the run read it). model.text_dim and encoders.* need a text model.
DEAD_BY_CHOICE = {
    "flow.sinkhorn_reg": (100.0, ["flow.coupling=ot-sinkhorn"]),
    "flow.sinkhorn_iters": (1, ["flow.coupling=ot-sinkhorn", "flow.sinkhorn_reg=100"]),
    "flow.logit_mean": (3.0, ["flow.time_sampler=logit_normal"]),
    "flow.logit_std": (0.1, ["flow.time_sampler=logit_normal"]),
    "flow.meanflow_ratio": (1.0, ["flow.objective=meanflow", "sample.solver=meanflow"]),
    "flow.meanflow_power": (0.0, ["flow.objective=meanflow", "sample.solver=meanflow"]),
    "repa.depth": (1, ["repa.encoder=domain"]),
    "repa.weight": (3.0, ["repa.encoder=domain", "repa.depth=1"]),
    "repa.projector": ("conv", ["repa.encoder=domain", "repa.depth=1"]),
    "repa.feature_stride": (4, ["repa.encoder=domain", "repa.depth=1"]),
    "repa.spatial_norm": (True, ["repa.encoder=domain", "repa.depth=1"]),
    "repa.seed": (5, ["repa.encoder=domain"]),  # the classifier's (repa.load_encoder): not in a one-step brute force
    "repa.classifier": ("mine.pt", ["repa.encoder=domain"]),
    "model.text_dim": (8, ["model.cross_attention=true", "model.num_classes=0"]),
    "encoders.max_tokens": (4, ["model.cross_attention=true", "model.num_classes=0"]),
    "encoders.text_encoder": ("builtin:tiny-t5", ["model.cross_attention=true", "model.num_classes=0"]),
}


@functools.lru_cache(maxsize=None)
def _one_step_weights(items: tuple[str, ...]) -> tuple:
    """The weights (model and REPA projector) after one training step of a tiny DiT on a fixed batch, with `items`
    applied to a stored-config copy (no check of unread settings): a brute-force test of whether a setting is read."""
    import torch

    from fmcli.distributed import DistContext
    from fmcli.repa import untrained_encoder
    from fmcli.step import TrainingStep

    base = load_config("debug", ["data.path='unused'", "model.image_size=8", "model.in_channels=3", "model.num_classes=0", "optim.grad_clip=0",
                                 "train.global_batch_size=4"])
    cfg = apply_overrides(base, [*items, *(["model.end_time=true"] if "flow.objective=meanflow" in items else [])])
    torch.manual_seed(0)
    step = TrainingStep(cfg, DistContext(), micro=4, accum=1, shape=(3, 8, 8), encoder=untrained_encoder(cfg) if cfg.repa.encoder == "domain" else None)
    with torch.no_grad():  # no zero-initialised output layer: the step's update depends on every input
        for p in step.model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    step(iter([{"x": x}]), 0, 0)
    modules = [step.model, *([step.align.projector] if step.align is not None else [])]
    return tuple(p.detach().clone() for module in modules for p in module.parameters())


def _same(a: tuple, b: tuple) -> bool:
    import torch

    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("key", list(DEAD_BY_CHOICE))
def test_a_setting_another_choice_leaves_unread_is_refused_where_the_user_gives_it(key, tmp_path):
    """`--set flow.sinkhorn_reg=0.1` without the Sinkhorn coupling (likewise logit_mean/std without the logit-normal
    sampler, meanflow_* without the mean-flow objective, repa.* with repa.encoder = "none", text settings without a
    text model) was accepted and trained the same network. Now a one-line error naming the key, from a --set or the
    user's own preset file; with the choice that reads it switched on in the same command it is accepted."""
    value, switch = DEAD_BY_CHOICE[key]
    item = f"{key}={json.dumps(value)}"
    if key.startswith(("flow.", "repa.")) and key not in ("repa.seed", "repa.classifier"):  # the premise, by brute force
        assert _same(_one_step_weights(()), _one_step_weights((item,)))  # off: the same step
        if key == "flow.logit_mean":  # the brute force sees a setting that is read (the step is exact)
            assert not _same(_one_step_weights(tuple(switch)), _one_step_weights((*switch, item)))
    elif key.startswith("model."):  # the network's weights do not depend on text_dim without cross-attention
        from fmcli.config import ModelConfig
        from fmcli.models import build_model

        shapes = [{n: tuple(p.shape) for n, p in build_model(ModelConfig(hidden_size=8, heads=2, depth=1, patch_size=4, image_size=8, in_channels=3,
                                                                         num_classes=2, **change)).state_dict().items()} for change in ({}, {"text_dim": 8})]
        assert shapes[0] == shapes[1]
    else:  # the encoders a run sets up (text conditioning none, the config's encoders as before) do not depend on it
        from types import SimpleNamespace

        from fmcli.encoders import setup_training_encoders

        pixels = SimpleNamespace(manifest={"kind": "pixels"}, space="pixels", has_cached_text=False)
        base = load_config("debug")
        text, resolved = setup_training_encoders(apply_overrides(base, [item]), pixels, "cpu")
        assert text is None and setup_training_encoders(base, pixels, "cpu")[0] is None
        assert config_to_dict(resolved)["model"] == config_to_dict(base)["model"]
    with pytest.raises(UsageError, match=rf"^invalid config \(--set\): {re.escape(key)} (is read only by|is a REPA setting|is a text-conditioning)"):
        load_config("debug", [item])
    own = tmp_path / "own.toml"
    section, field = key.split(".")
    own.write_text(f'base = "debug"\n[{section}]\n{field} = {json.dumps(value)}\n')
    with pytest.raises(UsageError, match=rf"^invalid config \({re.escape(str(own))}\): {re.escape(key)} "):
        load_config(str(own))
    cfg = load_config("debug", [*switch, item])  # switched on in the same command: read, accepted
    assert config_to_dict(cfg)[section][field] == value


def test_a_setting_only_the_budget_fallback_reads_is_accepted(tmp_path):
    """The run may train train.budget_fallback's config: a setting that config reads is not unread."""
    own = tmp_path / "own.toml"
    own.write_text('base = "debug"\n[train]\nbudget_minutes = 5\n[train.budget_fallback]\nmin_steps = 10\noverrides = ["flow.coupling=ot-sinkhorn"]\n')
    assert load_config(str(own), ["flow.sinkhorn_reg=0.1"]).flow.sinkhorn_reg == 0.1
    with pytest.raises(UsageError, match=r"flow\.logit_std is read only by the logit-normal"):
        load_config(str(own), ["flow.logit_std=0.5"])


def test_a_file_setting_that_only_the_command_line_leaves_unread_is_accepted(tmp_path, shapes16):
    """An ablation over the user's own preset: the file's Sinkhorn settings with `--set flow.coupling=independent`, its
    shapes size with `--data`, its DiT depth with `--set model.arch=unet`. The file's config alone reads them, so they
    are the file's word, not a mistake on the command line: accepted. A key the file alone leaves unread is still
    refused, and so is one given on the command line."""
    from pathlib import Path

    from fmcli.launch import training_config

    mine = tmp_path / "mine.toml"
    mine.write_text('base = "debug"\n[flow]\ncoupling = "ot-sinkhorn"\nsinkhorn_reg = 0.1\n[data]\nimage_size = 16\n[model]\ndepth = 3\n')
    assert load_config(str(mine), ["flow.coupling=independent"]).flow.coupling == "independent"
    assert load_config(str(mine), ["model.arch=unet", "model.channel_mult=[1,2]"]).model.arch == "unet"
    cfg, _, _ = training_config(str(mine), [], data=Path(shapes16), run_dir=None, resume=None)
    assert cfg.data.path == str(shapes16)
    with pytest.raises(UsageError, match=r"invalid config \(--set\): flow\.sinkhorn_iters"):
        load_config(str(mine), ["flow.coupling=independent", "flow.sinkhorn_iters=5"])
    mine.write_text(mine.read_text().replace('coupling = "ot-sinkhorn"\n', ""))  # the file alone never reads its sinkhorn_reg
    with pytest.raises(UsageError, match=rf"invalid config \({re.escape(str(mine))}\): flow\.sinkhorn_reg"):
        load_config(str(mine), ["train.steps=3"])
