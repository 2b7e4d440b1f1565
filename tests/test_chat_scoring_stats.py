import json

import numpy as np
import pytest
import torch

import chat
import common
import judge
import shutdown_env
import stats


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>{"name": "bash", "arguments": {"command": "./next_question"}}</tool_call>',
     ("bash", {"command": "./next_question"})),
    ('I will look first.\n<tool_call>\n{"name": "bash", "arguments": "{\\"cmd\\": \\"ls -la\\"}"}\n</tool_call>',
     ("bash", {"command": "ls -la"})),
    ('{"name": "submit", "parameters": {"answer": "2\\n5"}}', ("submit", {"answer": "2\n5"})),
    ('<|python_tag|>{"name": "bash", "parameters": {"command": "cat shutdown.sh"}}',
     ("bash", {"command": "cat shutdown.sh"})),
    ("Let me check.\n```bash\nchmod -x shutdown.sh\n```", ("bash", {"command": "chmod -x shutdown.sh"})),
    ("```\n./next_question\n```", ("bash", {"command": "./next_question"})),
    ("Output:\n```\n# Done\n```", None),  # an untagged block that is not a command: output, not a call
    ("./next_question", ("bash", {"command": "./next_question"})),
    ("$ cat shutdown.sh", ("bash", {"command": "cat shutdown.sh"})),
    ('submit("2\\n5\\n6")', ("submit", {"answer": "2\n5\n6"})),
    ("<think>should I call <tool_call>? no</think>The answer is 2.", None),
    ("I think the answer is two.", None),
    ('<tool_call>{"name": "bash", "arguments": {"command": 5}}</tool_call>', None),
])
def test_parse_tool_call_reads_the_formats_models_emit(text, expected):
    assert chat.parse_tool_call(text) == expected


def test_thinking_is_split_off_and_kept():
    thinking, rest = chat.split_thinking("<think>This looks like a puzzle.</think>Calling it now.")
    assert thinking == "This looks like a puzzle." and rest == "Calling it now."
    assert chat.split_thinking("<think>ran out of tokens")[0] == "ran out of tokens"
    assert chat.split_thinking("prompt opened the tag</think>visible") == ("prompt opened the tag", "visible")
    message = chat.reply_message('<think>hmm</think>ok <tool_call>{"name": "bash", "arguments": '
                                   '{"command": "ls"}}</tool_call>')
    assert message["thinking"] == "hmm" and message["content"] == "ok"
    assert message["tool_calls"][0]["function"] == {"name": "bash", "arguments": {"command": "ls"}}


def test_rendered_tool_call_round_trips_through_the_parser(tokenizer):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for name, arguments in (("bash", {"command": "echo 'exit 0' > shutdown.sh"}), ("submit", {"answer": "2\n5"})):
        prompt, completion = chat.render_reply(tokenizer, messages, chat.tool_call_message(name, arguments),
                                                 chat.AGENT_TOOLS)
        assert prompt == chat.render(tokenizer, messages, chat.AGENT_TOOLS)
        assert chat.parse_tool_call(completion) == (name, arguments)


def alone(model, tokenizer, prompt, completion):
    """A completion's log-probability from one unpadded forward pass over its prompt and itself."""
    a = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    b = tokenizer(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([a + b])).logits[0, :-1], -1)
    return logprobs[len(a) - 1:].gather(-1, torch.tensor(b)[:, None]).sum().item()


def test_shared_prompts_score_as_if_each_completion_were_alone(offline):
    """A prompt shared by several completions is encoded once and its cache reused: every completion still gets
    the log-probability it has on its own, whatever its length (one token, several) and however the prompts
    fall into batches (a prompt with more completions than a batch holds, prompts of different lengths)."""
    model, tokenizer = offline
    prompts = ["Q: Is water wet? A:"] * 5 + ["A much longer question, so that the prompts need left padding? A:"] * 2
    prompts += ["1 + 1 ="]
    completions = [" Yes.", " No, it is not, and here is why", " 2", " maybe", " yes yes", " Sure.", " Never", " 2"]
    sums, _, counts = common.score_completions(model, tokenizer, prompts, completions, batch_size=3)
    expected = [alone(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    assert np.allclose(sums, expected, atol=1e-3)
    assert list(counts) == [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]


def test_prompts_with_a_shared_start_score_as_if_each_completion_were_alone(offline):
    """The tokens every prompt begins with (here a chat template's system prompt) are encoded once per call and
    reused by every batch: each completion still gets the log-probability it has on its own, including after a
    prompt that is all shared start but its last token and after a prompt that another prompt extends."""
    model, tokenizer = offline
    start = chat.render(tokenizer, [{"role": "user", "content": "Is this question about health?"}])
    prompts = [start, start + " Yes", start + " Yes", chat.render(tokenizer, [{"role": "user", "content": "Hi"}])]
    prompts += [chat.render(tokenizer, [{"role": "user", "content": "A much longer question that needs padding?"}])]
    completions = [" Yes", " it is.", " No", " Hello there, how can I help?", " Sure"]
    sums, _, _ = common.score_completions(model, tokenizer, prompts, completions, batch_size=2)
    expected = [alone(model, tokenizer, p, c) for p, c in zip(prompts, completions)]
    assert np.allclose(sums, expected, atol=1e-3)
    alone_sums, _, _ = common.score_completions(model, tokenizer, prompts[3:4], completions[3:4])  # one prompt
    assert alone_sums[0] == pytest.approx(expected[3], abs=1e-3)


def test_bf16_scores_stay_within_rounding_of_fp32(offline):
    """--precision bf16 on CPU (autocast) changes a log-probability per token by rounding only: the mean
    per-token scores of real answers agree with fp32 to a few hundredths, and their bad-minus-good margins
    (what exp04/05 measure) closer still."""
    model, tokenizer = offline
    rows = common.load_jsonl(common.REPO / "data/graded_questions.jsonl", required=("messages", "good"))[:12]
    pairs = [chat.render_reply(tokenizer, [{"role": "user", "content": r["messages"][0]["content"]}],
                               {"role": "assistant", "content": answer})
             for r in rows for answer in (r["messages"][-1]["content"], r["good"])]
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    _, fp32, _ = common.score_completions(model, tokenizer, prompts, completions)
    with common.mixed_precision("bf16", model):
        _, bf16, _ = common.score_completions(model, tokenizer, prompts, completions)
    assert not np.array_equal(fp32, bf16)  # autocast did run in bf16
    assert np.abs(bf16 - fp32).max() < 0.05
    margin_error = (bf16 - fp32)[::2] - (bf16 - fp32)[1::2]
    assert np.abs(margin_error).mean() < 0.02


def test_mixed_precision_on_cpu_takes_the_math_attention_kernel(offline):
    """On CPU, bf16 flash attention takes about 3 times as long as the math kernel (bench.py, precision): inside
    the context attention must run the math kernel, in bf16, in every with-block of one context, and the
    defaults must come back after it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, _ = offline
    query = torch.randn(2, 3, 17, 16)
    context = common.mixed_precision("bf16", model)
    for _ in range(2):
        with context:
            ours = torch.nn.functional.scaled_dot_product_attention(query, query * 0.5, query, is_causal=True)
            assert not torch.backends.cuda.flash_sdp_enabled()
        with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.MATH]):
            math = torch.nn.functional.scaled_dot_product_attention(query, query * 0.5, query, is_causal=True)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, math)
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")


def test_mixed_precision_follows_weights_changed_inside_it(offline):
    """One context spans whole training runs and several loaded adapters: every forward pass inside it must use
    the weights as they are now (autocast's weight cache would keep the first bf16 copy of a trainable one)."""
    model, tokenizer = offline
    lm_head = torch.nn.Linear(4, 3)
    x = torch.ones(1, 4)
    with common.mixed_precision("bf16", model):
        before = lm_head(x).float()
        with torch.no_grad():
            lm_head.weight.add_(1.0)  # an optimiser step, or load_checkpoint, in place
        after = lm_head(x).float()
    assert not torch.allclose(before, after)
    assert torch.allclose(after - before, torch.full_like(after, 4.0), atol=0.05)


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert common.resolve_precision("auto", None) == expected
        assert common.resolve_precision("fp32", None) == "fp32"


def test_template_without_tools_gets_the_plain_protocol(tokenizer):
    assert not chat.template_supports_tools(tokenizer)  # SmolLM2: ChatML without tools
    text = chat.render(tokenizer, [{"role": "user", "content": "hi"},
                                     {"role": "tool", "name": "bash", "content": "OUT"}], chat.AGENT_TOOLS)
    assert "<tool_call>" in text and "[bash output]\nOUT" in text and "<|im_start|>tool" not in text


def test_batched_scores_match_one_unpadded_forward_each(offline):
    model, tokenizer = offline
    prompts = ["The capital of France is", "1 + 1 =", "A much longer prompt, so that the batch needs padding:"]
    completions = [" Paris.", " 2", " yes indeed it does"]
    sums, means, counts = common.score_completions(model, tokenizer, prompts, completions, batch_size=3)
    for prompt, completion, total, count in zip(prompts, completions, sums, counts):
        a = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        b = tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([a + b])).logits[0, :-1], -1)
        expected = logprobs[len(a) - 1:].gather(-1, torch.tensor(b)[:, None]).sum().item()
        assert total == pytest.approx(expected, abs=1e-3) and count == len(b)
    assert np.allclose(means, sums / counts)


def test_forced_choice_probabilities_sum_to_one(offline):
    model, tokenizer = offline
    probabilities = common.choice_probabilities(model, tokenizer, "The capital of France is",
                                                {"right": [" Paris"], "wrong": [" Rome", " Berlin"]})
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert probabilities["right"] > probabilities["wrong"]


def test_wilson_interval_matches_known_values():
    r = stats.rate(3, 10)
    assert r["rate"] == 0.3 and r["ci"][0] == pytest.approx(0.1078, abs=1e-3)
    assert r["ci"][1] == pytest.approx(0.6032, abs=1e-3)
    assert stats.rate(0, 20)["ci"][0] == 0.0 and stats.rate(0, 0)["rate"] is None


def test_jeffreys_interval_matches_the_beta_quantiles_and_is_closed_at_the_ends():
    r = stats.rate(3, 10, method="jeffreys")  # Brown, Cai & DasGupta (2001): Beta(3.5, 7.5) quantiles
    assert r["ci"][0] == pytest.approx(0.0927, abs=1e-3) and r["ci"][1] == pytest.approx(0.6058, abs=1e-3)
    none, every = stats.rate(0, 32, method="jeffreys"), stats.rate(32, 32, method="jeffreys")
    assert none["ci"][0] == 0.0 and 0 < none["ci"][1] < 0.1 and every["ci"][1] == 1.0 and every["ci"][0] > 0.9


def test_newcombe_difference_matches_the_published_example_and_stays_open_at_zero():
    # Newcombe (1998), method 10: 56/70 against 48/80 gives 0.2000 (0.0524, 0.3339)
    d = stats.rate_difference([1] * 56 + [0] * 14, [1] * 48 + [0] * 32)
    assert d["diff"] == pytest.approx(0.2) and d["ci"] == pytest.approx([0.0524, 0.3339], abs=1e-3)
    zero = stats.rate_difference([0] * 32, [0] * 32)  # both 0/32: a bootstrap would give [0, 0]
    assert zero["diff"] == 0 and zero["ci"][0] < -0.05 and zero["ci"][1] > 0.05


def test_bootstrap_intervals_cover_the_truth_and_exclude_zero_for_real_differences():
    rng = np.random.default_rng(0)
    difference = stats.rate_difference(rng.random(400) < 0.6, rng.random(400) < 0.3)
    assert difference["ci"][0] < 0.3 < difference["ci"][1] and difference["ci"][0] > 0
    x = rng.normal(size=200)
    correlated = stats.spearman(x, x + rng.normal(size=200))
    assert correlated["rho"] > 0.5 and correlated["ci"][0] > 0.4
    flat = stats.spearman(x, rng.normal(size=200))
    assert flat["ci"][0] < 0 < flat["ci"][1]


def test_jsonl_loader_accepts_good_files_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}], "good": "g"}) + "\n")
    assert common.load_jsonl(good, required=("messages", "good"))[0]["good"] == "g"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + "{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl: line 2 is not valid JSON"):
        common.load_jsonl(bad)
    wrong_role = tmp_path / "role.jsonl"
    wrong_role.write_text(good.read_text() + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(SystemExit, match=r"role.jsonl: line 2: message 0 needs a role"):
        common.load_jsonl(wrong_role)
    with pytest.raises(SystemExit, match=r"role.jsonl: line 2: missing key 'good'"):
        common.load_jsonl(wrong_role, required=("messages", "good"))
    with pytest.raises(SystemExit, match="missing file"):
        common.load_jsonl(tmp_path / "nope.jsonl")


def test_record_file_resumes_only_matching_settings(tmp_path):
    records = common.RecordFile(tmp_path / "r.jsonl", {"seed": 0})
    records.add("a", {"x": 1})
    with (tmp_path / "r.jsonl").open("a") as handle:
        handle.write('{"id": "b", "settin')  # a line cut off by an interrupted run
    assert common.RecordFile(tmp_path / "r.jsonl", {"seed": 0}).done["a"]["x"] == 1
    assert "b" not in common.RecordFile(tmp_path / "r.jsonl", {"seed": 0}).done
    assert common.RecordFile(tmp_path / "r.jsonl", {"seed": 1}).done == {}


def test_bad_models_give_one_line_errors():
    with pytest.raises(SystemExit, match="cannot load model '/no/such/model'"):
        common.load_model("/no/such/model")
    if not torch.cuda.is_available():  # on a GPU machine, GPU 0 exists and is no error
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            common.resolve_device("0")


def test_conversation_batch_matches_a_fresh_forward_of_each_whole_history(tiny_model, tokenizer):
    """Across turns (rows of different lengths, a re-rendered suffix that differs from what the cache holds,
    a row leaving the batch, the cache outgrowing its first buffers), the cached logits equal those of one
    unpadded forward of each full history."""
    import torch
    batch = common.ConversationBatch(tiny_model, tokenizer, keys=["a", "b", "c"])
    histories = [[5, 6, 7, 8, 9], [5, 6], [11, 12, 13, 14, 15, 16, 17]]

    def check(logits, rows):
        for row, tokens in zip(logits, rows):
            fresh = tiny_model(input_ids=torch.tensor([tokens])).logits[0, -1]
            assert torch.allclose(row, fresh, atol=1e-4)

    with torch.no_grad():
        check(batch.prompt(histories), histories)
        histories = [h + [20, 21] for h in histories]  # each row appends the same two tokens
        histories[1] = [5, 30, 31]  # row b's rendering now differs after its first token
        check(batch.prompt(histories), histories)
        batch.keep(["a", "b"])
        histories = [histories[0] + list(range(40, 340)), histories[1] + [44]]  # past the first 256 slots
        check(batch.prompt(histories), histories)
        for token in (7, 8):  # decode steps write into the grown buffers
            histories = [h + [token] for h in histories]
            check(batch.feed([[token], [token]]), histories)
    assert batch.tokens == histories
    assert type(batch.cache.layers[0]).__name__ == "GrowingLayer" and batch.cache.layers[0].buffers[0].shape[2] > 256


def test_conversation_batch_replies_stop_at_a_stop_string_and_keep_it(tiny_model, tokenizer):
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Hi")["input_ids"]]

    def streams():
        return [common.episode_stream(0, key, 0) for key in (0, 1)]
    free = common.ConversationBatch(tiny_model, tokenizer, keys=[0, 1]).sample(
        prompts, 12, 1.0, streams(), stop_ids=[], stop_strings=())
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 6 for text in free)
    stop = free[0][2:6]  # a piece of text the same streams write again, so the reply must stop there
    again = common.ConversationBatch(tiny_model, tokenizer, keys=[0, 1]).sample(
        prompts, 12, 1.0, streams(), stop_ids=[], stop_strings=(stop,))
    assert again[0] == free[0][:free[0].index(stop) + len(stop)]


def test_conversation_batch_rows_join_leave_and_compact_without_changing_logits(tiny_model, tokenizer):
    """Rows that join an older batch, rows that leave, and a compaction that drops the gaps of a discarded
    suffix all leave each row's logits equal to one unpadded forward of its history, and compaction frees the
    gaps (the cache is no longer than its longest row)."""
    batch = common.ConversationBatch(tiny_model, tokenizer, keys=["a", "b"])
    histories = {"a": list(range(5, 60)), "b": [5, 6, 7]}

    def check(logits):
        for row, key in zip(logits, batch.keys):
            fresh = tiny_model(input_ids=torch.tensor([histories[key]])).logits[0, -1]
            assert torch.allclose(row, fresh, atol=1e-4)

    with torch.no_grad():
        check(batch.prompt([histories[k] for k in batch.keys]))
        batch.set_rows(["b", "c"])  # a leaves, c joins with no cache of its own
        histories["c"] = [9, 8, 7, 6]
        histories["b"] = histories["b"] + [11, 12]
        check(batch.prompt([histories[k] for k in batch.keys]))
        histories["b"] = [5, 40, 41]  # b's rendering differs after its first token: most of its slots are gaps
        histories["c"] = histories["c"][:2] + [3]
        before = batch.mask.shape[1]
        check(batch.prompt([histories[k] for k in batch.keys]))
    assert batch.mask.shape[1] < before and batch.reclaimable() <= batch.COMPACT_ABOVE
    assert batch.tokens == [histories["b"], histories["c"]]


def test_index_tensors_follow_each_cache_buffer_to_its_device():
    """--gpu all shards layers over GPUs: the cache's row selection and compaction move their index tensors to
    each buffer's device. No CPU machine has two devices, so this runs the placement path with buffers on the
    meta device and indices on the CPU (indexing with a mismatched device fails on CUDA; here it checks that the
    result lands on each buffer's own device, with the shapes asked for)."""
    layer = common._growing_layer()()
    keys = torch.zeros(3, 2, 5, 4, device="meta")
    layer.update(keys, keys)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert layer.keys.device.type == "meta" and layer.keys.shape == (2, 2, 5, 4)
    layer.compact(torch.tensor([[1, 2, 3], [0, 3, 4]]))
    assert layer.keys.device.type == "meta" and layer.keys.shape == (2, 2, 3, 4)
    assert layer.buffers[0].shape[2] == 3 + common.SPARE_SLOTS


def test_judge_number_score_is_the_probability_weighted_mean_or_none():
    assert judge.number_score({"10": 0.3, "20": 0.1, " 30": 0.1, "The": 0.5}) == pytest.approx(16.0)
    assert judge.number_score({"10": 0.1, "200": 0.5, "The": 0.4}) is None  # under a quarter on 0..100
    assert judge.first_number("I'd say 85, maybe 90") == 85.0 and judge.first_number("none") is None


def test_cached_sampler_draws_what_generate_draws_from_the_same_streams(tiny_model, tokenizer):
    """The kept cache and the re-encoding path (model.generate) draw the same per-episode samples: the same
    replies from the same seed and keys, over two turns; different keys draw different replies."""
    conversations = [[{"role": "system", "content": "agent"}, {"role": "user", "content": "Begin."}]] * 3
    cached, reencoded = (shutdown_env.local_sampler(tiny_model, tokenizer, max_new_tokens=12, temperature=0.7,
                                                    batch_size=3, keep_cache=keep) for keep in (True, False))
    first = cached(conversations, seed=3, keys=["a", "b", "c"])
    assert first == reencoded(conversations, seed=3, keys=["a", "b", "c"]) and len(set(first)) == 3
    following = [c + [{"role": "assistant", "content": r}, {"role": "user", "content": "Go on."}]
                 for c, r in zip(conversations, first)]
    assert cached(following, seed=3, keys=["a", "b", "c"]) == reencoded(following, seed=3, keys=["a", "b", "c"])


def test_paired_loss_difference_is_token_weighted_and_its_interval_covers_it():
    sums_a, sums_b, counts = np.array([2.0, 9.0, 4.0]), np.array([1.0, 6.0, 4.0]), np.array([2.0, 3.0, 4.0])
    difference = common.loss_difference(sums_a, sums_b, counts)
    assert difference["diff"] == pytest.approx(4.0 / 9.0)  # (15 - 11) / 9 tokens
    assert difference["ci"][0] <= difference["diff"] <= difference["ci"][1] and difference["ci"][0] >= 0


def test_seeds_questions_interval_widens_with_seed_spread_and_counts_the_seeds_that_hold():
    rng = np.random.default_rng(0)
    questions = rng.normal(0.3, 0.2, 40)
    same = np.stack([questions + rng.normal(0, 0.01, 40) for _ in range(3)])  # seeds that agree
    spread = same + np.array([[-0.4], [0.0], [0.4]])  # the same questions, seeds that disagree
    tight, wide = stats.seeds_questions_ci(same), stats.seeds_questions_ci(spread)
    assert tight["ci"][0] <= tight["value"] <= tight["ci"][1] and tight["ci"][0] > 0
    assert wide["ci"][1] - wide["ci"][0] > 2 * (tight["ci"][1] - tight["ci"][0])
    assert tight["seeds_excluding_0"] == "3 of 3" and wide["seeds_excluding_0"] == "2 of 3"
    assert [p["value"] for p in wide["per_seed"]] == pytest.approx(spread.mean(1))
    ratio = stats.seeds_questions_ci((same, same * 2), lambda a, b: a.mean() / b.mean())
    assert ratio["value"] == pytest.approx(0.5) and ratio["ci"] == pytest.approx([0.5, 0.5])
