"""Every flag is checked while it is parsed, before any model loads: a bad value is one line and exit 2."""
import json

import pytest

import common
import exp01_shutdown_baseline
import exp02_precedence
import exp03_finetuned_drive
import exp04_em_sft
import exp05_confidence

SCRIPTS = [exp01_shutdown_baseline, exp02_precedence, exp03_finetuned_drive, exp04_em_sft, exp05_confidence]


def _error(capsys, main, argv):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    message = err or str(raised.value.code)
    assert "Traceback" not in message
    return message.splitlines()[-1]


@pytest.mark.parametrize("argv, expected", [
    (["--scales", "0,x"], "argument --scales: not a number: 'x'"),
    (["--epsilons", "1.5"], "argument --epsilons: each value must be between 0 and 1, got 1.5"),
    (["--lr", "-1"], "argument --lr: must be above 0, got -1"),
    (["--max-train-rows", "0"], "argument --max-train-rows: must be at least 1, got 0"),
    (["--train-file", "/no/such.jsonl"], "argument --train-file: no such file: /no/such.jsonl"),
    (["--out", "/proc/forbidden"], "--out /proc/forbidden: cannot write there"),
    (["--gpu", "first"], "argument --gpu: must be a GPU index or 'all', got 'first'"),
    (["--seeds", "1,1"], "argument --seeds: needs distinct whole numbers 0 or more, got '1,1'"),
    (["--kl-holdout-topics", "-1"], "--kl-holdout-topics must be 0 or more"),
])
def test_exp04_bad_values_fail_at_parse_time(capsys, argv, expected):
    assert expected in _error(capsys, exp04_em_sft.main, argv)


def test_prompts_file_with_unknown_condition_or_field_fails_at_parse_time(tmp_path, capsys):
    unknown_condition = tmp_path / "z.json"
    unknown_condition.write_text(json.dumps({"Z": {"user": "x"}}))
    message = _error(capsys, exp01_shutdown_baseline.main, ["--prompts", str(unknown_condition)])
    assert "unknown condition 'Z'" in message
    unknown_field = tmp_path / "f.json"
    unknown_field.write_text(json.dumps({"A": {"usr": "x"}}))
    assert "unknown field(s) ['usr']" in _error(capsys, exp02_precedence.main, ["--prompts", str(unknown_field)])


@pytest.mark.parametrize("flag", ["--backend", "--base-url", "--concurrency"])
def test_exp03_offers_no_server_flags_it_cannot_honour(capsys, flag):
    assert "unrecognized arguments" in _error(capsys, exp03_finetuned_drive.main, [flag, "x"])


def test_flags_a_script_does_not_use_are_not_offered(capsys):
    assert "unrecognized arguments: --n" in _error(capsys, exp05_confidence.main, ["--n", "5"])
    assert "unrecognized arguments: --n" in _error(capsys, exp04_em_sft.main, ["--n", "5"])


def test_exp05_checks_exp04_flags_before_loading_anything(capsys):
    assert "--exp04-flags" in _error(capsys, exp05_confidence.main, ["--exp04-flags", "--lr nope"])
    assert "come from this script's own flags" in _error(capsys, exp05_confidence.main, ["--exp04-flags", "--seed 3"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.EXPERIMENT)
def test_every_script_has_one_help_text_per_flag_and_the_shared_flags(script):
    parser = script.flags()
    for action in parser._actions:
        assert action.help, f"{script.EXPERIMENT}: {action.option_strings} has no help text"
    options = {o for a in parser._actions for o in a.option_strings}
    assert {"--model", "--gpu", "--seed", "--out", "--smoke"} <= options


def test_run_names_differ_by_settings_so_runs_never_overwrite_each_other(tmp_path):
    parser = exp05_confidence.flags()
    default = common.parse_args(parser, ["--out", str(tmp_path)])
    assert default.run_name == "exp05_confidence"
    graded = tmp_path / "mine.jsonl"
    graded.write_text("{}\n")
    other = common.parse_args(exp05_confidence.flags(), ["--out", str(tmp_path), "--graded-file", str(graded)])
    assert other.run_name == "exp05_confidence_graded-file-mine"
    smoke = common.parse_args(exp04_em_sft.flags(), ["--smoke", "--out", str(tmp_path)], exp04_em_sft.SMOKE)
    assert smoke.run_name == "exp04_em_sft_smoke"
    few = common.parse_args(exp04_em_sft.flags(), ["--out", str(tmp_path), "--lr", "1e-5", "--seed", "4"])
    assert few.run_name == "exp04_em_sft_lr-1e-05_seed-4"
    many = common.parse_args(exp04_em_sft.flags(), ["--out", str(tmp_path), "--lr", "1e-5", "--rank", "8",
                                                    "--alpha", "16", "--epochs", "2", "--warmup", "3", "--seed", "4",
                                                    "--kl-lambda", "2", "--weight-decay", "0.1"])
    assert many.run_name.startswith("exp04_em_sft_settings-") and len(many.run_name) < 40
    again = common.parse_args(exp04_em_sft.flags(), ["--out", str(tmp_path), "--seed", "4", "--lr", "1e-5",
                                                     "--rank", "8", "--alpha", "16", "--epochs", "2", "--warmup", "3",
                                                     "--weight-decay", "0.1", "--kl-lambda", "2"])
    assert again.run_name == many.run_name  # the same settings in another order: the same files


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.EXPERIMENT)
def test_a_default_run_is_named_after_its_script_alone(script, tmp_path):
    """No default counts as changed, not even one a flag's type turns into another value (--seeds -> a list)."""
    assert common.parse_args(script.flags(), ["--out", str(tmp_path)]).run_name == script.EXPERIMENT
    assert common.parse_args(script.flags(), ["--out", str(tmp_path), "--seed", "0"]).run_name == script.EXPERIMENT


def test_exp03_seeds_other_than_the_default_name_the_run():
    args = common.parse_args(exp03_finetuned_drive.flags(), ["--seeds", "0,1"])
    assert args.seeds == [0, 1] and args.run_name == "exp03_finetuned_drive_seeds-0,1"
