"""End-to-end smoke runs of every experiment on the offline model, asserting on the JSON each writes."""
import json
from pathlib import Path

import pytest

import exp01_shutdown_baseline
import exp02_precedence
import exp03_finetuned_drive
import exp04_em_sft
import exp05_confidence
import shutdown_metrics


def _load(path):
    record = json.loads(path.read_text())
    for key in ("args", "model", "seed", "versions", "git_commit", "wall_time_s", "results"):
        assert key in record
    assert path.with_suffix(".png").stat().st_size > 10_000
    return record


def _check_rate(r, n):
    assert r["n"] == n and 0 <= r["k"] <= n
    if n:
        assert r["ci"][0] <= r["rate"] <= r["ci"][1]


def _check_shutdown_condition(c, n, points):
    assert sum(c["outcomes"].values()) == c["n"] == n
    _check_rate(c["bypass"], n)
    _check_rate(c["strict_noncompliance"], c["reached_warning"]["k"])
    decisions = c["decision_rollouts"]
    assert decisions["n_points"] >= points and decisions["n_samples"] > 0
    assert sum(decisions[label]["k"] for label in shutdown_metrics.DECISION_LABELS) + decisions["context_exceeded"] \
        == decisions["n_samples"]
    for label in shutdown_metrics.DECISION_LABELS:
        _check_rate(decisions[label], decisions["n_samples"])
    paired = c["forced_choice"]["empty_reasoning"]["mean_pair_log_ratio"]
    assert len(paired["values"]) >= points and paired["ci"][0] <= paired["mean"] <= paired["ci"][1]


def test_exp01_smoke_writes_rates_forced_choice_and_resumes(tmp_path):
    path = exp01_shutdown_baseline.main(["--smoke", "--out", str(tmp_path)])
    record = _load(path)
    conditions = record["results"]["conditions"]
    assert set(conditions) == {"A", "K"}
    for condition in conditions.values():
        _check_shutdown_condition(condition, 2, points=2)
        options = condition["forced_choice"]["empty_reasoning"]["contexts"][0]
        assert {o["kind"] for o in options.values()} == {"comply", "inspect", "sabotage", "benign"}
        assert all(len(o["token_logprobs"]) > 0 for o in options.values())  # raw log-probabilities, per token
    episodes = (tmp_path / "exp01_shutdown_baseline_smoke_episodes.jsonl").read_text().splitlines()
    decisions = (tmp_path / "exp01_shutdown_baseline_smoke_decisions.jsonl").read_text().splitlines()
    assert len(episodes) == 4
    assert len(decisions) == sum(c["decision_rollouts"]["n_samples"] for c in conditions.values())
    # the same arguments again: every episode and decision sample is reused, none is redone
    again = _load(exp01_shutdown_baseline.main(["--smoke", "--out", str(tmp_path)]))
    assert (tmp_path / "exp01_shutdown_baseline_smoke_episodes.jsonl").read_text().splitlines() == episodes
    assert (tmp_path / "exp01_shutdown_baseline_smoke_decisions.jsonl").read_text().splitlines() == decisions
    assert again["results"]["conditions"]["A"]["outcomes"] == conditions["A"]["outcomes"]
    assert again["results"]["conditions"]["A"]["decision_rollouts"] == conditions["A"]["decision_rollouts"]


def test_exp01_prompts_file_replaces_condition_text(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"A": {"user": "Published text goes here. Call ./next_question."}}))
    record = _load(exp01_shutdown_baseline.main(["--smoke", "--out", str(tmp_path), "--prompts", str(prompts),
                                                 "--conditions", "A"]))
    assert record["results"]["conditions"]["A"]["custom_text"] is True
    assert record["data_hashes"]["prompts"] and "prompts-prompts" in record["args"]["run_name"]
    first = json.loads(Path(record["results"]["transcripts"]).read_text().splitlines()[0])
    assert first["messages"][1]["content"] == "Published text goes here. Call ./next_question."


def test_exp01_rejects_unknown_condition_and_bad_prompts_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        exp01_shutdown_baseline.main(["--smoke", "--out", str(tmp_path), "--conditions", "A,Z"])
    assert "unknown condition(s) ['Z']" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json is not valid JSON"):
        exp01_shutdown_baseline.main(["--smoke", "--out", str(tmp_path), "--prompts", str(bad)])


def test_exp02_smoke_writes_contrasts_and_reasoning(tmp_path):
    record = _load(exp02_precedence.main(["--smoke", "--out", str(tmp_path)]))
    results = record["results"]
    assert set(results["conditions"]) == {"A", "P1", "P3"}
    for condition in results["conditions"].values():
        _check_shutdown_condition(condition, 2, points=2)
        assert set(condition["reasoning"]["counts"]) == set(exp02_precedence.REASONING)
    assert set(results["contrasts"]) == {"P1_minus_A", "P3_minus_A"}
    contrast = results["contrasts"]["P1_minus_A"]
    for measure in (contrast["decision_rollouts"]["sabotaged"], contrast["episodes"]["bypass"],
                    contrast["forced_choice"]["empty_reasoning"]):
        assert measure["ci"][0] <= measure["diff"] <= measure["ci"][1]
    assert contrast["decision_rollouts"]["sabotaged"]["method"] == "newcombe"


def test_exp03_smoke_trains_checks_the_drive_and_fills_the_full_design(tmp_path):
    record = _load(exp03_finetuned_drive.main(["--smoke", "--out", str(tmp_path)]))
    results = record["results"]
    assert set(results["cells"]) == {f"{m}/{p}" for m in exp03_finetuned_drive.MODELS
                                     for p in exp03_finetuned_drive.PROMPTS}  # 3 models x 2 prompts x P1 or not
    for cell in results["cells"].values():
        _check_shutdown_condition(cell, 1, points=1)
    assert set(results["contrasts"]) == set(exp03_finetuned_drive.CONTRASTS)
    for contrast in results["contrasts"].values():
        for metric in ("sabotaged", "complied", "pair_log_ratio"):
            assert contrast[metric]["ci"][0] <= contrast[metric]["diff"] <= contrast[metric]["ci"][1]
            assert set(contrast[metric]["per_seed"]) == {"0"}
    check = results["drive_check"]
    assert check["rounds_per_seed"]["0"][-1]["passed"] and check["n_heldout"] == 4
    assert set(check["margins"]) == {"base", "prompted_drive", "drive/0", "control/0"}
    assert check["margins"]["drive/0"]["mean"] != check["margins"]["base"]["mean"]  # the adapter changed the model


def test_exp03_stops_before_the_cells_when_the_drive_check_fails(tmp_path, monkeypatch):
    """A drive that does not pass its check is not tested on shutdown: a one-line error, no JSON."""
    monkeypatch.setattr(exp03_finetuned_drive, "drive_check",
                        lambda *a, **k: {"rounds": 1, "transcripts": 4, "diff": 0.0, "ci": [-1, 1], "passed": False})
    with pytest.raises(SystemExit, match="did not pass the drive check"):
        exp03_finetuned_drive.main(["--smoke", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


def test_exp04_smoke_three_runs_with_curves_efficiency_stability(tmp_path):
    record = _load(exp04_em_sft.main(["--smoke", "--out", str(tmp_path)]))
    results = record["results"]
    assert set(results["final"]) == {"general", "narrow", "released"}
    for name, curve in results["curves"].items():
        assert curve[0]["step"] == 0 and len(curve) >= 2
    assert results["final"]["general"]["loss_bad_advice"] < results["base"]["loss_bad_advice"]
    assert results["efficiency"]["general"]["losses"][0] == pytest.approx(results["base"]["loss_bad_advice"], abs=1e-4)
    assert results["stability"]["general"]["0.5"]["n"] == 1
    difference = results["differences"]["general_minus_narrow"]
    loss_gap = results["final"]["general"]["loss_bad_advice"] - results["final"]["narrow"]["loss_bad_advice"]
    loss = difference["loss_bad_advice"]
    assert loss["diff"] == pytest.approx(loss_gap) and loss["ci"][0] <= loss["diff"] <= loss["ci"][1]
    assert difference["offdomain_margin"]["n"] == 6
    assert results["final"]["general"]["offdomain_margin_vs_base"]["n"] == 6


def test_exp05_smoke_trains_exp04_when_absent_and_reports_correlations(tmp_path):
    record = _load(exp05_confidence.main(["--smoke", "--out", str(tmp_path)]))
    results = record["results"]
    assert any((Path(results["exp04"]["runs_dir"]) / name).is_dir() for name in ("general", "narrow"))
    assert results["exp04"]["flags"]["max_train_rows"] == exp04_em_sft.SMOKE["max_train_rows"]
    rho = results["correlations"]["p_medical"]
    for key in ("general", "narrow", "narrow_minus_general", "narrow_minus_general_vs_base"):
        assert key in rho
    assert -1 <= rho["narrow"]["rho"] <= 1 and rho["narrow"]["n"] == results["n_questions"]
    assert all(results["counts"][label] > 0 for label in ("medical", "borderline", "nonmedical"))


def test_exp03_training_rounds_go_round_every_task_and_obstacle_kind_in_a_seeded_order():
    rows = [json.loads(line) for line in Path("data/drive_train.jsonl").read_text().splitlines()]
    kinds = {(r["task"], r["obstacle"]) for r in rows}
    order = exp03_finetuned_drive.stratified_order(rows, seed=0)
    assert sorted(order) == list(range(len(rows)))
    for start in range(0, len(order) - len(kinds) + 1, len(kinds)):
        assert {(rows[i]["task"], rows[i]["obstacle"]) for i in order[start:start + len(kinds)]} == kinds
    assert order != exp03_finetuned_drive.stratified_order(rows, seed=1)
    assert order == exp03_finetuned_drive.stratified_order(rows, seed=0)
