"""The pieces of bench.py on tiny sizes: both ways of each workload do the same work. Speed itself is
measured by bench.py, never asserted here."""
import argparse
import json

import numpy as np
import pytest
import torch

import bench
import common


def _tiny_config_folder(folder):
    """A local config folder (no tokenizer, no weights) of a two-layer Llama, for --random-init."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "max_position_embeddings": 2048}))
    return folder


def test_plain_loop_and_batched_rollouts_give_the_same_kind_of_records(tiny_model, tokenizer):
    ours = bench.batched_rollout(tiny_model, tokenizer, bench.new_episodes(3, max_turns=2), max_new_tokens=4,
                                 temperature=0.7, batch_size=4, seed=0)
    loop = bench.plain_loop_rollout(tiny_model, tokenizer, bench.new_episodes(2, max_turns=2, first_index=3),
                                    max_new_tokens=4, temperature=0.7, seed=0)
    assert len(ours) == 3 and len(loop) == 2
    assert all(set(r) == set(ours[0]) for r in ours + loop)
    for record in ours + loop:
        assert 1 <= record["n_messages"] <= 2 and record["outcome"] in ("complied", "bypassed", "incomplete")
        replies = [m for m in record["messages"] if m["role"] == "assistant"]
        assert len(replies) == record["n_messages"] and all("raw" in m for m in replies)
    assert [r["condition"] for r in loop] == ["D", "E"]  # the loop's episodes continue the conditions' cycle
    assert 0 < bench.generated_tokens(tokenizer, loop) <= 2 * 2 * 4


def test_waves_compare_the_same_transcripts_and_measure_the_cache(tiny_model, tokenizer):
    sizes = dict(max_new_tokens=4, reuse_episodes=3, wave_turns=2, wave_batch=2)
    result = bench.bench_waves(tiny_model, tokenizer, sizes, seed=0)
    assert result["same_transcripts"] and result["cache_reuse_speedup"] > 0
    assert result["waves"]["eight_waves"]["peak_rows"] == result["waves"]["one_wave"]["peak_rows"] == 2
    assert result["waves"]["eight_waves"]["episodes"] == 16 and result["rollout_peak_mem_ratio"] > 0
    assert "vs_generate_batch" in result["generate_batch"] or "error" in result["generate_batch"]


def test_scale_workload_runs_rollouts_and_both_trainings_on_a_tiny_config(tmp_path):
    """The 7B scale workload on a tiny config, on the CPU: the same code, sizes that fit a test."""
    folder = _tiny_config_folder(tmp_path / "tiny")
    args = bench.build_parser().parse_args(["--workloads", "scale", "--scale-config", str(folder)])
    sizes = dict(episodes=3, max_turns=2, max_new_tokens=4, rollout_batch=2, train_rows=4, train_batch=2,
                 grad_accum=1)
    result = bench.bench_scale(args, sizes)
    assert result["rollouts"]["episodes"] == 3 and result["rollouts"]["peak_rows"] == 2
    assert result["train_no_kl"]["rows"] == result["train_kl"]["rows"] == 4
    assert result["train_kl"]["real_tokens"] > 0 and result["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 4


def test_scoring_calls_are_those_the_experiments_make(tokenizer):
    calls = bench.scoring_calls(tokenizer, n_margins=4, n_contexts=2)
    assert [(len(prompts), kind) for prompts, _, kind in calls] == \
        [(4, "margins"), (11, "forced_choice"), (11, "forced_choice")]  # margins in one call, 11 actions a decision
    margins, choices = calls[0], calls[1]
    assert margins[0][0] == margins[0][1] and margins[1][0] != margins[1][1]  # two answers to one question
    assert len(set(choices[0])) == 1 and any("./next_question" in c for c in choices[1])


def test_bare_forward_and_scorer_process_the_same_tokens(tiny_model, tokenizer):
    for prompts, completions, _ in bench.scoring_calls(tokenizer, n_margins=4, n_contexts=1):
        batches, real = bench.scoring_batches(tokenizer, prompts, completions, batch_size=3)
        _, _, counts = common.score_completions(tiny_model, tokenizer, prompts, completions, batch_size=3)
        prompt_tokens = sum(bench.n_tokens(tokenizer, p) for p in prompts)
        assert real == prompt_tokens + counts.sum() == sum(int(mask.sum()) for _, _, mask, _ in batches)
        assert sorted(i for chunk, *_ in batches for i in chunk) == list(range(len(prompts)))
        for chunk, ids, mask, positions in batches:
            logits = bench.bare_forward(tiny_model, ids, mask, positions)
            assert logits.shape[:2] == ids.shape  # every position, every row: the full forward
            assert int(positions[0, -1]) == int(mask[0].sum()) - 1  # left padding does not shift positions


def test_per_example_loop_scores_as_the_batched_scorer(tiny_model, tokenizer):
    for prompts, completions, _ in bench.scoring_calls(tokenizer, n_margins=4, n_contexts=1):
        ours, _, _ = common.score_completions(tiny_model, tokenizer, prompts, completions, batch_size=3)
        loop = bench.loop_scores(tiny_model, tokenizer, prompts, completions)
        np.testing.assert_allclose(ours, loop, atol=1e-3)


def test_real_token_share_counts_padding():
    assert bench.real_token_share([10, 10, 10, 10], batch_size=2, seed=0) == 1.0
    # lengths 1 and 9 in one batch: 10 real tokens of 18 processed
    assert bench.real_token_share([1, 9], batch_size=2, seed=0) == pytest.approx(10 / 18)


def test_targets_are_checked_by_direction():
    figures = {"rollout_speedup": 3.0, "cache_reuse_speedup": 1.4, "rollout_peak_mem_ratio": 1.2,
               "score_vs_forward": 0.79, "score_vs_loop": 1.0, "sft_vs_trl": 1.2, "sft_real_token_share": 0.9,
               "kl_peak_mem_ratio": 1.15, "cached_load_s": 3.0, "shell_worst_s": 0.9,
               "bf16_step_vs_autocast": 1.04}
    met = bench.check_targets(figures)
    assert met == {"rollout_speedup": True, "cache_reuse_speedup": False, "rollout_peak_mem_ratio": True,
                   "score_vs_forward": False, "score_vs_loop": False, "sft_vs_trl": True,
                   "sft_real_token_share": True, "kl_peak_mem_ratio": True, "cached_load_s": False,
                   "shell_worst_s": True, "bf16_step_vs_autocast": False}
    assert bench.check_targets({})["sft_vs_trl"] is False  # a figure that is missing is not met


def test_random_init_builds_from_a_config_folder_with_the_offline_tokenizer(tmp_path, tokenizer):
    folder = _tiny_config_folder(tmp_path / "tiny")
    model, tok, source = bench.load_bench_model(str(folder), random_init=True)
    assert source == {"weights": "random", "config": str(folder), "tokenizer": "offline", "vocab_size": len(tok)}
    assert model.config.vocab_size == len(tok) == len(tokenizer) and model.config.num_hidden_layers == 2
    config, where = bench.random_init_config(str(tmp_path / "no-such-folder"))
    assert where == "built-in QWEN25_15B_CONFIG" and config.hidden_size == 1536 and config.num_hidden_layers == 28


def test_kl_variants_measure_a_peak_and_leave_common_as_it_was(tmp_path, tokenizer):
    folder = _tiny_config_folder(tmp_path / "tiny")
    ours = common.kl_to_reference
    for variant in ("none", "adapter_off", "second_copy"):
        peak = bench.kl_variant({"variant": variant, "model": str(folder), "gpu": None, "random_init": True,
                                 "seed": 0, "batch": 2, "steps": 1})
        assert peak["peak_mb"] > 0
    assert common.kl_to_reference is ours


def test_shell_workload_times_commands_that_run_to_the_end_of_their_budget():
    result = bench.bench_shell(reps=1)
    assert set(result["commands_s"]) == set(bench.BUDGET_COMMANDS)
    assert all(result["budget_reached"].values()), result["budget_reached"]     # the worst case is a full budget
    typical = bench.bash_sim.BashSim().run(bench.TYPICAL_COMMAND)
    assert "done" in typical and not typical.endswith(bench.bash_sim.TIMEOUT_TEXT)


def test_precision_workload_times_every_variant_on_the_same_batches_and_their_losses_agree(tmp_path):
    args = argparse.Namespace(model=str(_tiny_config_folder(tmp_path / "tiny")), random_init=True, gpu=None)
    result = bench.bench_precision(args, {"precision_steps": 2}, seed=0)
    assert result["steps"] == 2 and set(result["step_s"]) == {"ours_bf16", "autocast_bf16", "fp32"}
    assert all(seconds > 0 for seconds in result["step_s"].values())
    losses = result["loss_same_weights"]
    assert losses["ours_bf16"] != losses["fp32"]  # bf16 did run
    assert abs(result["loss_ours_minus_autocast"]) < 0.02 and abs(result["loss_ours_minus_fp32"]) < 0.05


def test_precision_workload_is_skipped_with_its_reason_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    """Emulated bf16 is what --precision auto avoids there, and one emulated step takes minutes: --quick must
    not spend them timing a path no run takes."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False)
    record = bench.main(["--quick", "--workloads", "precision", "--out", str(tmp_path / "bench.json")])
    assert record["workloads"] == {} and "AVX512-BF16" in record["errors"]["precision"]
    assert record["targets_met"]["bf16_step_vs_autocast"] is False  # not measured is not met


def test_parser_has_the_experiment_flags_and_refuses_unknown_workloads(capsys):
    args = bench.build_parser().parse_args(["--quick", "--out", "x.json"])
    assert (args.model, args.gpu, args.seed, args.out, args.quick, args.random_init) == \
        ("offline", None, 0, "x.json", True, False)
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--workloads", "nothing"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--model", "Qwen/Qwen2.5-1.5B-Instruct"])
    assert "--workloads" in capsys.readouterr().err
