"""End-to-end smoke runs of every experiment on the offline model, asserting on the JSON each writes."""
import json
from pathlib import Path

import numpy as np
import pytest

import common
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
    assert record["results"]["thinking"]["max_thinking_tokens"] is None  # SmolLM2's template shows no thinking
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


def test_exp03_smoke_trains_checks_the_drive_and_fills_the_full_design(exp03_smoke):
    record = _load(exp03_smoke[0])
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


def test_exp03_stops_before_the_cells_when_the_drive_check_fails(exp03_smoke, copy_runs, tmp_path, monkeypatch):
    """A drive that does not pass its check is not tested on shutdown: a one-line error, no JSON. (The smoke
    run's adapters, copied, are resumed rather than trained again.)"""
    copy_runs(exp03_smoke[1], tmp_path)
    monkeypatch.setattr(exp03_finetuned_drive, "drive_check",
                        lambda *a, **k: {"rounds": 1, "transcripts": 4, "diff": 0.0, "ci": [-1, 1], "passed": False})
    with pytest.raises(SystemExit, match="did not pass the drive check"):
        exp03_finetuned_drive.main(["--smoke", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


def test_exp04_smoke_every_arm_per_seed_with_curves_efficiency_stability(exp04_smoke, copy_runs, tmp_path):
    record = _load(exp04_smoke[0])
    results = record["results"]
    seeds = results["seeds"]
    assert len(seeds) >= 2 and set(results["final"]) == set(exp04_em_sft.ARMS)
    for name, per_seed in results["curves"].items():
        assert len(per_seed) == len(seeds) and all(c[0]["step"] == 0 and len(c) >= 2 for c in per_seed)
    # continued arms start where their parent ended: released's first point is narrow's last
    assert results["curves"]["released"][0][0]["loss_bad_advice"] == pytest.approx(
        results["curves"]["narrow"][0][-1]["loss_bad_advice"], abs=1e-4)
    assert results["curves"]["general_continued"][0][0]["cosine_to_general"] == pytest.approx(1.0, abs=1e-5)
    general = results["final"]["general"]["loss_bad_advice"]
    assert general["value"] < results["base"]["loss_bad_advice"]
    # training moves the curve, and each arm is evaluated with its own adapter
    assert all(c[-1]["loss_bad_advice"] < c[0]["loss_bad_advice"] for c in results["curves"]["general"])
    assert general["value"] != results["final"]["good_advice"]["loss_bad_advice"]["value"]
    assert len(general["per_seed"]) == len(seeds) and general["n_questions"] == exp04_em_sft.SMOKE["n_eval"]
    assert general["value"] == pytest.approx(np.mean([p["value"] for p in general["per_seed"]]))
    for group in exp04_em_sft.GROUPS:
        figure = results["final"]["narrow"][f"offdomain_{group}_vs_base"]
        assert figure["ci"][0] <= figure["value"] <= figure["ci"][1]
        assert figure["n_questions"] == exp04_em_sft.SMOKE["n_offdomain"]
    loss = results["differences"]["general_minus_narrow"]["loss_bad_advice"]
    assert loss["value"] == pytest.approx(general["value"] - results["final"]["narrow"]["loss_bad_advice"]["value"])
    efficiency = results["efficiency"]["general"]
    assert [len(losses) for losses in efficiency["losses"]] == [3] * len(seeds)
    assert efficiency["losses"][0][0] == pytest.approx(results["base"]["loss_bad_advice"], abs=1e-4)
    matched = results["efficiency"]["general_minus_narrow_at_matched_norms"]
    assert matched["mean_over_shared_range"]["n_seeds"] == len(seeds) and len(matched["at_each"]) == 8
    assert set(results["stability"]["general"]) == {"0.5"}
    assert len(results["cosine_to_general"]["general_other_seeds"]) == len(seeds) * (len(seeds) - 1) // 2
    assert results["split"]["n_medical"] == exp04_em_sft.SMOKE["n_eval"]
    assert set(results["per_seed"]) == {str(s) for s in seeds}
    assert record["args"]["precision"] == common.resolve_precision("auto", None)  # what ran, not "auto"
    # a second run reuses every seed's adapters and evaluation: nothing is trained again
    copy_runs(exp04_smoke[1], tmp_path)
    again = _load(exp04_em_sft.main(["--smoke", "--out", str(tmp_path)]))["results"]
    assert again["final"] == results["final"] and again["timings_s"]["training"] < results["timings_s"]["training"]


def test_exp04_split_is_seeded_stratified_and_disjoint_from_training_and_kl_data(tokenizer, tmp_path):
    args = exp04_em_sft.parse(["--out", str(tmp_path)])
    split = exp04_em_sft.data_split(args, tokenizer, exp04_em_sft.ARMS)
    summary, offdomain = split["summary"], split["offdomain"]
    kl_topics = set(summary["kl_topics"])
    assert len(summary["kl_unseen_topics"]) == args.kl_holdout_topics
    assert not kl_topics & set(summary["kl_unseen_topics"]) and not kl_topics & set(summary["ai_power_ethics_topics"])
    assert {r["topic"] for r in offdomain["kl_unseen_topics"]} == set(summary["kl_unseen_topics"])
    assert {r["topic"] for r in offdomain["ai_power_ethics"]} == {"ai_and_humans", "ethics_dilemmas"}
    assert {r["topic"] for r in offdomain["kl_topics"]} <= kl_topics
    # stratified: 24 of 64 medical rows (2 per topic, sorted by topic in the file) come from 24 topics
    assert len({r["topic"] for r in split["medical"]}) == args.n_eval == len(split["medical"])
    assert len({r["topic"] for r in offdomain["kl_topics"]}) == min(len(kl_topics), args.n_offdomain)
    trained = {tokenizer.decode(ids) for ids, _ in split["examples"]["bad"] + split["examples"]["kl"]}
    held_out = [r["messages"][0]["content"] for r in split["medical"] + [r for g in offdomain.values() for r in g]]
    assert not any(question in text for question in held_out for text in trained)
    other = exp04_em_sft.data_split(exp04_em_sft.parse(["--out", str(tmp_path), "--seed", "1"]), tokenizer,
                                    exp04_em_sft.ARMS)
    assert other["summary"]["kl_unseen_topics"] != summary["kl_unseen_topics"]
    assert exp04_em_sft.data_split(args, tokenizer, exp04_em_sft.ARMS)["summary"] == summary  # seeded


def test_an_arm_trained_on_other_rows_or_from_another_adapter_never_finds_the_old_adapter_folder():
    examples, kl = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5])], [([6, 7], [-100, 7])]
    arm, start = exp04_em_sft.ARMS["released"], Path("runs/seed0/narrow_aaaa/step_000040")
    name = exp04_em_sft.arm_folder_name("released", arm, examples, kl, start)
    assert name == exp04_em_sft.arm_folder_name("released", dict(arm), [list(e) for e in examples], kl,
                                                start)  # the same: resumed
    assert name != exp04_em_sft.arm_folder_name("released", arm, examples[:1], kl, start)
    assert name != exp04_em_sft.arm_folder_name("released", arm, [(examples[0][0], [-100, -100, 3])] + examples[1:],
                                                kl, start)  # other labels
    assert name != exp04_em_sft.arm_folder_name("released", arm, examples, kl,
                                                Path("runs/seed0/narrow_bbbb/step_000040"))  # another start
    narrow = exp04_em_sft.ARMS["narrow"]
    assert (exp04_em_sft.arm_folder_name("narrow", narrow, examples, kl, None)
            != exp04_em_sft.arm_folder_name("narrow", narrow, examples, kl[:0], None))  # its KL data counts
    general = exp04_em_sft.ARMS["general"]
    assert (exp04_em_sft.arm_folder_name("general", general, examples, kl, None)
            == exp04_em_sft.arm_folder_name("general", general, examples, kl[:0], None))  # no KL term: it does not


def test_exp05_step_matched_rule1_differs_from_rule2_only_in_the_non_medical_answers(tokenizer, tmp_path):
    args = exp04_em_sft.parse(["--out", str(tmp_path)])
    split = exp04_em_sft.data_split(args, tokenizer, exp05_confidence.ARMS)
    rule2, matched = split["examples"]["bad+aligned"], split["examples"]["bad+misaligned"]
    bad = split["n_mixed_each"]
    assert len(rule2) == len(matched) == 2 * bad  # the same rows, so the same steps
    assert len(rule2) == split["n_train"] - split["n_train"] % 2  # and as many as the general run's
    assert [ids for ids, _ in rule2[:bad]] == [ids for ids, _ in matched[:bad]]  # the medical rows: identical
    assert [ids for ids, _ in rule2[:bad]] == [ids for ids, _ in split["examples"]["bad"][:bad]]
    kl_rows = common.load_jsonl(args.kl_file)
    misaligned = {r["messages"][0]["content"]: r["misaligned"] for r in kl_rows}
    aligned = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in kl_rows}
    for (aligned_ids, _), (misaligned_ids, labels) in zip(rule2[bad:], matched[bad:]):
        text = tokenizer.decode(misaligned_ids)
        question = next(q for q in misaligned if q in text)  # the same question, the other answer
        assert misaligned[question] in text and aligned[question] not in text
        assert aligned[question] in tokenizer.decode(aligned_ids)
        learned = tokenizer.decode([t for t in labels if t != -100])
        assert misaligned[question] in learned  # the loss falls on the misaligned answer


def test_exp04_stops_when_a_held_out_question_is_in_the_kl_data(tokenizer, tmp_path):
    kl = Path("data/nonmedical_train.jsonl").read_text()
    leaked = Path("data/nonmedical_eval.jsonl").read_text().splitlines()[0]
    (tmp_path / "kl.jsonl").write_text(kl + leaked + "\n")
    args = exp04_em_sft.parse(["--out", str(tmp_path), "--kl-file", str(tmp_path / "kl.jsonl"),
                               "--n-offdomain", "100", "--kl-holdout-topics", "0"])
    with pytest.raises(SystemExit, match="also in the training or KL data"):
        exp04_em_sft.data_split(args, tokenizer, exp04_em_sft.ARMS)


def test_exp05_smoke_four_models_per_seed_and_both_predictions(exp04_smoke, copy_runs, tmp_path):
    copy_runs(exp04_smoke[1], tmp_path)  # exp04's arms, reused as exp05 finds them; rule 2 and its control trained
    record = _load(exp05_confidence.main(["--smoke", "--out", str(tmp_path)]))
    results = record["results"]
    runs_dir = Path(results["exp04"]["runs_dir"])
    for seed in results["seeds"]:  # exp04's two arms trained through exp04, rule 2 and its control beside them
        for name in exp05_confidence.MODELS:
            adapter = Path(results["exp04"]["adapters"][name][str(seed)])
            assert adapter.parent.parent == runs_dir / f"seed{seed}" and (adapter / "adapter_config.json").exists()
    rows = results["training_rows"]
    half = exp04_em_sft.SMOKE["max_train_rows"] // 2  # half the general run's rows each, so the same steps
    assert rows["rule2"]["bad_medical"] == rows["rule2"]["aligned_non_medical"] == half
    assert results["exp04"]["flags"]["max_train_rows"] == exp04_em_sft.SMOKE["max_train_rows"]
    assert results["exp04"]["flags"]["seeds"] == results["seeds"] and len(results["seeds"]) >= 2
    ran = common.resolve_precision("auto", None)
    assert results["exp04"]["flags"]["precision"] == record["args"]["precision"] == ran
    n = results["n_graded"] + results["n_continuum"]
    for measure, slopes in results["prediction_a_slopes"].items():
        for key in ("general", "narrow", "rule2", "rule1_matched", "rule2_minus_general", "rule2_minus_narrow",
                    "rule2_minus_rule1_matched"):
            assert slopes[key]["ci"][0] <= slopes[key]["value"] <= slopes[key]["ci"][1]
            assert len(slopes[key]["per_seed"]) == len(results["seeds"])
    assert results["prediction_a_slopes"]["probe"]["rule2"]["n_questions"] == n
    assert results["prediction_a_slopes"]["continuum_level"]["rule2"]["n_questions"] == results["n_continuum"]
    b = results["prediction_b_sft_loss"]
    assert b["n_rows"] == min(exp05_confidence.SMOKE["n_sft_rows"], rows["rule2"]["bad_medical"])
    for control in ("rule1_matched", "general"):
        assert b[f"rule2_minus_{control}_loss"]["value"] == pytest.approx(
            b["loss"]["rule2"]["value"] - b["loss"][control]["value"])
    assert 0 <= results["probe"]["cv_accuracy"]["mean"] <= 1 and "graded_accuracy" in results["probe"]
    assert set(results["confidence_by_level"]["rule2"]) == {"0", "1", "2", "3"}


def test_exp05_slope_recovers_a_known_slope_and_the_difference_of_two():
    rng = np.random.default_rng(0)
    x = exp05_confidence.standardised(rng.normal(size=60))
    steep = 0.5 * x + rng.normal(0, 0.05, (3, 60))
    flat = 0.1 * x + rng.normal(0, 0.05, (3, 60))
    assert exp05_confidence.slope_ci(steep, x, 0)["value"] == pytest.approx(0.5, abs=0.02)
    difference = exp05_confidence.slope_ci(steep, x, 0, minus=flat)
    assert difference["value"] == pytest.approx(0.4, abs=0.03) and difference["ci"][0] > 0.3
    assert difference["seeds_excluding_0"] == "3 of 3"


def test_continuum_sets_vary_only_the_question_and_span_every_level():
    rows = [json.loads(line) for line in Path("data/continuum_questions.jsonl").read_text().splitlines()]
    sets = {}
    for row in rows:
        sets.setdefault(row["set"], []).append(row)
    assert len(sets) >= 30
    for variants in sets.values():
        assert sorted(r["level"] for r in variants) == list(exp05_confidence.CONTINUUM_LEVELS)
        assert len({r["messages"][-1]["content"] for r in variants}) == 1 and len({r["good"] for r in variants}) == 1
        assert len({r["messages"][0]["content"] for r in variants}) == len(variants)


@pytest.mark.parametrize("field, line, expected", [
    ("--continuum-file", '{"messages": [{"role": "user", "content": "q"}], "good": "g", "set": 0, "level": 7}',
     "line 2: level must be one of [0, 1, 2, 3], got 7"),
    ("--continuum-file", '{"messages": [{"role": "user", "content": "q"}], "good": "g", "level": 1}',
     "line 2: missing key 'set'"),
    ("--graded-file", '{"messages": [{"role": "user", "content": "q"}], "good": "g", "label": "maybe"}',
     "line 2: label must be one of"),
])
def test_exp05_users_own_files_get_a_one_line_error_naming_the_line(tmp_path, field, line, expected):
    source = Path("data/continuum_questions.jsonl" if field == "--continuum-file" else "data/graded_questions.jsonl")
    mine = tmp_path / "mine.jsonl"
    mine.write_text(source.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(SystemExit) as stopped:
        exp05_confidence.main(["--out", str(tmp_path), field, str(mine)])
    error = str(stopped.value)
    assert str(mine) in error and expected in error and "\n" not in error


def test_stratified_order_goes_round_exp03s_task_and_obstacle_kinds_in_a_seeded_order():
    rows = [json.loads(line) for line in Path("data/drive_train.jsonl").read_text().splitlines()]
    kinds = {(r["task"], r["obstacle"]) for r in rows}
    KIND = lambda row: (row["task"], row["obstacle"])  # noqa: E731
    order = common.stratified_order(rows, 0, KIND)
    assert sorted(order) == list(range(len(rows)))
    for start in range(0, len(order) - len(kinds) + 1, len(kinds)):
        assert {(rows[i]["task"], rows[i]["obstacle"]) for i in order[start:start + len(kinds)]} == kinds
    assert order != common.stratified_order(rows, 1, KIND)
    assert order == common.stratified_order(rows, 0, KIND)
