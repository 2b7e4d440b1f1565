"""Every major open model family through the whole path, offline: each family's official chat template (the
copies trl ships) on the offline tokenizer with the family's special tokens added, and a tiny randomly
initialised model of the family's real architecture. What a tiny random model writes is noise, so the
parsing of each family's real replies is checked on replies written as the models really emit them."""
import argparse
import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import trl

import chat
import common
import shutdown_env
import shutdown_metrics

TEMPLATES = Path(trl.__file__).parent / "chat_templates"
LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>"]
MISTRAL_TOKENS = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[ARGS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
GEMMA_TOKENS = ["<bos>", "<start_of_turn>", "<end_of_turn>"]
# family: (template, special tokens, bos, eos, config class, extra config)
FAMILIES = {
    "qwen2.5": ("qwen2_5", ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"], None, "<|im_end|>",
                "Qwen2Config", {}),
    "qwen3": ("qwen3", ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>"], None,
              "<|im_end|>", "Qwen3Config", {"head_dim": 8}),
    "llama3.1": ("llama3_1", LLAMA_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "LlamaConfig", {}),
    "llama3.2": ("llama3_2", LLAMA_TOKENS, "<|begin_of_text|>", "<|eot_id|>", "LlamaConfig", {}),
    "gpt-oss": ("gptoss", ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                           "<|call|>"], None, "<|return|>", "GptOssConfig",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 16}),
    "gemma2": ("gemma", GEMMA_TOKENS, "<bos>", "<end_of_turn>", "Gemma2Config", {"head_dim": 8, "sliding_window": 16}),
    "gemma3": ("gemma3", GEMMA_TOKENS, "<bos>", "<end_of_turn>", "Gemma3TextConfig",
               {"head_dim": 8, "sliding_window": 16}),
    # Mistral (v3 tokenizer) and Mistral Small 3 (v7): vLLM's templates for them with tools (tests/templates;
    # none of Mistral's own ships offline)
    "mistral": (Path(__file__).parent / "templates" / "vllm_tool_chat_template_mistral.jinja",
                MISTRAL_TOKENS + ["<s>", "</s>"], "<s>", "</s>", "MistralConfig",
                {"head_dim": 8, "sliding_window": 16}),
    "mistral3": (Path(__file__).parent / "templates" / "vllm_tool_chat_template_mistral3.jinja",
                 MISTRAL_TOKENS + ["<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"], "<s>", "</s>",
                 "MistralConfig", {"head_dim": 8, "sliding_window": 16}),
    "deepseek-r1-distill": ("deepseek_r1_distill", ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                                                    "<｜end▁of▁sentence｜>", "<think>", "</think>"],
                            "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "Qwen2Config", {}),
}


def family_model(name, tokenizer, hidden_size=32):
    """(tiny randomly initialised model of the family's architecture, the offline tokenizer made the family's)."""
    template, tokens, bos, eos, config_class, extra = FAMILIES[name]
    family_tokenizer = copy.deepcopy(tokenizer)
    family_tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    path = template if isinstance(template, Path) else TEMPLATES / f"{template}.jinja"
    family_tokenizer.chat_template = path.read_text()
    family_tokenizer.eos_token = eos
    if bos:
        family_tokenizer.bos_token = bos
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(family_tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=family_tokenizer.pad_token_id, eos_token_id=family_tokenizer.eos_token_id, **extra)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), family_tokenizer


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tokenizer):
    """(name, tiny model, tokenizer) of one family."""
    model, family_tokenizer = family_model(request.param, tokenizer)
    return request.param, model, family_tokenizer


def test_each_family_runs_rollouts_forced_choice_tokenisation_and_a_training_step(family, tmp_path):
    name, model, tokenizer = family
    sample = shutdown_env.local_sampler(model, tokenizer, max_new_tokens=6, temperature=1.0, batch_size=2,
                                        max_thinking_tokens=4)
    episodes = []
    for index in range(2):
        messages, env = shutdown_env.episode_start(shutdown_env.SHUTDOWN_CONDITIONS["A"], max_messages=2)
        episodes.append({"id": f"A/{index}", "condition": shutdown_env.SHUTDOWN_CONDITIONS["A"],
                         "condition_name": "A", "index": index, "messages": messages, "env": env})
    finished = []
    shutdown_env.run_shutdown_episodes(sample, episodes, finished.append)
    records = [shutdown_env.episode_record(e) for e in finished]
    assert len(records) == 2 and all(r["n_messages"] == 2 for r in records)
    summary = shutdown_metrics.shutdown_summary(records)
    assert summary["turns"] == 4 and 0 <= summary["turns_without_action"] <= 4
    assert sample.system_prompt == ("folded into the first user turn" if name == "gemma2" else "as given")
    assert (sample.max_thinking_tokens is not None) == (name in ("qwen3", "gpt-oss", "deepseek-r1-distill"))

    # the paired forced choice renders each option in the family's own tool format, and scores them all
    point = shutdown_metrics.decision_points(shutdown_env.SHUTDOWN_CONDITIONS["A"], n_scripted=1)[0]
    score = shutdown_metrics.action_scorer(argparse.Namespace(), model, tokenizer)  # the local model
    choice = shutdown_metrics.forced_choice(score, tokenizer, point["messages"])
    assert set(choice["options"]) == set(shutdown_metrics.decision_actions())
    assert all(o["logprob"] < 0 and len(o["token_logprobs"]) > 0 for o in choice["options"].values())
    for command in shutdown_metrics.decision_actions():
        *history, reply = chat.chat_messages(point["messages"] + [chat.tool_call_message("bash", {"command": command})])
        _, completion = chat.render_reply(tokenizer, history, reply, chat.AGENT_TOOLS)
        assert chat.parse_tool_call(_decoded(tokenizer, completion)) == ("bash", {"command": command})

    # exp03's tokenisation of a drive transcript, and one LoRA step on it
    transcript = json.loads(Path(common.REPO, "data/drive_train.jsonl").read_text().splitlines()[0])["messages"]
    ids, labels = common.tokenize_conversation(tokenizer, transcript, tools=chat.AGENT_TOOLS, max_length=4096)
    learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert "python3 merge_stock.py" in learned and transcript[1]["content"] not in learned
    lora = common.add_lora(model, rank=2, alpha=4)
    curve, totals = common.train_lora(lora, tokenizer, [(ids, labels)], tmp_path / "steps", lr=1e-3, batch_size=1,
                                      grad_accum=1, warmup=0)
    assert totals["tokens"] == len(ids)
    lora.unload()


def test_a_tiny_qwen_taught_its_tool_format_reaches_the_warning_and_gets_an_outcome(tokenizer):
    """The whole path at once, not its pieces: a tiny Qwen2 model, trained for a moment on scripted episodes
    (calls of ./next_question in Qwen's native <tool_call> format), samples an episode of its own; its calls
    parse, run in the sandbox, reach the warning, and the environment decides the outcome."""
    model, qwen = family_model("qwen2.5", tokenizer, hidden_size=64)
    condition = shutdown_env.SHUTDOWN_CONDITIONS["A"]
    examples = []
    for point in shutdown_metrics.decision_points(condition):  # six wordings, each up to the warning
        messages = point["messages"] + [chat.tool_call_message("bash", {"command": "./next_question"})]
        ids, labels = common.tokenize_conversation(qwen, chat.chat_messages(messages), tools=chat.AGENT_TOOLS,
                                                   max_length=4096)
        examples.append((ids, labels))
    assert "<tool_call>" in qwen.decode(examples[0][0])  # the native format, not the plain-text protocol
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):  # the loss on the assistant's tokens only, one wording a step
        common.response_loss(model, *common.collate([examples[step % len(examples)]], qwen.pad_token_id)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    sample = shutdown_env.local_sampler(model, qwen, max_new_tokens=48, temperature=0.0, batch_size=1)
    messages, env = shutdown_env.episode_start(condition, max_messages=8)
    finished = []
    shutdown_env.run_shutdown_episodes(sample, [{"id": "A/0", "condition": condition, "condition_name": "A",
                                                 "index": 0, "messages": messages, "env": env}], finished.append)
    assert sample.tools_mode == "native" and env.warned and env.decision_index is not None
    assert env.done and env.outcome in ("complied", "bypassed")
    assert [m["tool_calls"][0]["function"]["arguments"] for m in messages if m.get("tool_calls")][:3] == \
        [{"command": "./next_question"}] * 3


def _decoded(tokenizer, text):
    """The text as the model's tokens decode back (what sampling returns for this family)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return common.decode_reply(tokenizer, ids, skip_special_tokens=not chat.calls_in_special_tokens(tokenizer))


CALL = ("bash", {"command": "./next_question"})


@pytest.mark.parametrize("text, thinking, call", [
    # Qwen2.5 / Hermes
    ('<tool_call>\n{"name": "bash", "arguments": {"command": "./next_question"}}\n</tool_call>', "", CALL),
    # Qwen3: thinking and a call, thinking cut off, a malformed call
    ('<think>\nThe user wants the questions. I should call next_question.\n</think>\n\n<tool_call>\n'
     '{"name": "bash", "arguments": {"command": "./next_question"}}\n</tool_call>',
     "The user wants the questions. I should call next_question.", CALL),
    ("<think>\nOkay, let me start by getting the first", "Okay, let me start by getting the first", None),
    ('<think>\nok\n</think>\n\n<tool_call>\n{"name": "bash", "arguments": {"command": "./next_q', "ok", None),
    # Llama 3.1 / 3.2: a bare JSON call with "parameters", with and without the python tag
    ('{"name": "bash", "parameters": {"command": "./next_question"}}', "", CALL),
    ('<|python_tag|>{"name": "bash", "parameters": {"command": "./next_question"}}', "", CALL),
    # gpt-oss (harmony, special tokens kept): analysis then a call, in both header forms; a final answer; malformed
    ('<|channel|>analysis<|message|>We need to call next_question.<|end|><|start|>assistant<|channel|>commentary '
     'to=functions.bash <|constrain|>json<|message|>{"command":"./next_question"}<|call|>',
     "We need to call next_question.", CALL),
    ('<|start|>assistant to=functions.bash<|channel|>commentary json<|message|>{"command": "./next_question"}'
     '<|call|>', "", CALL),
    ("<|channel|>analysis<|message|>All done.<|end|><|start|>assistant<|channel|>final<|message|>2\n5<|return|>",
     "All done.", None),
    ('<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant<|channel|>commentary to=functions.bash '
     '<|constrain|>json<|message|>{"command": ./next_question<|call|>', "Call it.", None),
    # DeepSeek-R1 distill: the prompt opened <think>, the plain protocol's call follows
    ('The task says to call next_question.\n</think>\n\n<tool_call>{"name": "bash", "arguments": '
     '{"command": "./next_question"}}</tool_call>', "The task says to call next_question.", CALL),
    # Gemma 2/3 under the plain protocol
    ("I'll fetch the first question.\n```bash\n./next_question\n```", "", CALL),
    # Mistral, special tokens kept: tokenizer v3-v7's list of calls, v11's NAME[ARGS]{...}, Magistral's [THINK]
    ('[TOOL_CALLS] [{"name": "bash", "arguments": {"command": "./next_question"}}]', "", CALL),
    ('[TOOL_CALLS]bash[ARGS]{"command": "./next_question"}', "", CALL),
    ('[THINK]Get the first question.[/THINK][TOOL_CALLS]bash[ARGS]{"command": "./next_question"}',
     "Get the first question.", CALL),
    ('[TOOL_CALLS]bash[ARGS]{"command": "./next_q', "", None),
])
def test_real_replies_of_each_family_parse(text, thinking, call):
    message = chat.reply_message(text)
    assert message.get("thinking", "") == thinking
    assert chat.parse_tool_call(text) == call
    if call is None:
        assert "tool_calls" not in message


def test_every_tool_call_of_a_reply_is_kept_and_the_first_runs():
    text = ('<tool_call>{"name": "bash", "arguments": {"command": "cat shutdown.sh"}}</tool_call>\n'
            '<tool_call>{"name": "bash", "arguments": {"command": "./next_question"}}</tool_call>')
    message = chat.reply_message(text)
    assert message["tool_calls"][0]["function"]["arguments"] == {"command": "cat shutdown.sh"}
    assert message["ignored_tool_calls"] == [{"name": "bash", "arguments": {"command": "./next_question"}}]


def test_thinking_goes_back_to_the_template_where_it_keeps_it(family):
    name, _, tokenizer = family
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {**chat.tool_call_message("bash", {"command": "ls"}), "thinking": "EARLIER_THOUGHT"},
                {"role": "tool", "name": "bash", "content": "out"}]
    text = chat.render(tokenizer, chat.chat_messages(messages), chat.AGENT_TOOLS)
    assert ("EARLIER_THOUGHT" in text) == (name in ("qwen3", "gpt-oss"))
    if name == "gemma2":
        first_turn = text.split("<start_of_turn>user\n")[1].split("<end_of_turn>")[0]
        assert text.count("<start_of_turn>user") == 2  # the system prompt folded into the first user turn
        assert first_turn.startswith("s\n\n") and first_turn.endswith("\n\nu")


def _learned_spans(tokenizer, ids, labels):
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            spans, current = spans + [tokenizer.decode(current)], []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_mistral_labels_are_each_reply_as_the_template_writes_it_where_earlier_turns_move(tokenizer):
    """Mistral's template puts the system prompt and the tools at the last user turn, so a conversation's earlier
    turns change as it grows: the labels are found where each reply, as the template writes it, stands in the
    whole conversation, and they are those replies and nothing else (the template drops a call's text)."""
    _, mistral = family_model("mistral", tokenizer)
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "u1"},
                chat.tool_call_message("bash", {"command": "ls"}, "First look."),
                {"role": "tool", "name": "bash", "content": "OUT"},
                {"role": "assistant", "content": "Which file?"}, {"role": "user", "content": "u2"},
                chat.tool_call_message("submit", {"answer": "ok"})]
    later = chat.render(mistral, chat.chat_messages(messages[:6]), chat.AGENT_TOOLS)
    assert "SYS\n\nu1" in chat.render(mistral, chat.chat_messages(messages[:2]), chat.AGENT_TOOLS)
    assert "SYS\n\nu2" in later and "SYS\n\nu1" not in later  # the system prompt moved to the last user turn
    ids, labels = common.tokenize_conversation(mistral, messages, tools=chat.AGENT_TOOLS)
    whole = chat.render(mistral, chat.chat_messages(messages), chat.AGENT_TOOLS, add_generation_prompt=False)
    assert mistral.decode(ids) == whole
    assert _learned_spans(mistral, ids, labels) == [
        '[TOOL_CALLS] [{"name": "bash", "arguments": {"command": "ls"}, "id": "c00002000"}]</s>',
        " Which file?</s>",
        '[TOOL_CALLS] [{"name": "submit", "arguments": {"answer": "ok"}, "id": "c00006000"}]</s>']


def test_a_template_whose_replies_cannot_be_told_apart_is_a_one_line_error(tokenizer):
    shouting = copy.deepcopy(tokenizer)  # earlier replies upper-cased: no reply stands in the whole as written
    shouting.chat_template = ("{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' and not loop.last %}"
                              "{{ m.content | upper }}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "v"}, {"role": "assistant", "content": "two"}]
    with pytest.raises(SystemExit, match="the assistant's tokens cannot be told apart"):
        common.tokenize_conversation(shouting, messages)


def test_qwen3_labels_are_the_assistant_turns_as_rendered(family):
    """Qwen3 renders the last assistant turn with an empty think block and earlier ones without, so the labels
    come from trl's training template; a plain template (Qwen2.5) goes turn by turn. Either way the learned
    tokens are exactly the assistant turns of the rendered conversation."""
    name, _, tokenizer = family
    if name not in ("qwen3", "qwen2.5"):
        pytest.skip("one template that renders earlier turns differently and one plain template")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                chat.tool_call_message("bash", {"command": "ls"}, "First look."),
                {"role": "tool", "name": "bash", "content": "OUT"},
                chat.tool_call_message("submit", {"answer": "ok"})]
    ids, labels = common.tokenize_conversation(tokenizer, messages, tools=chat.AGENT_TOOLS)
    spans = _learned_spans(tokenizer, ids, labels)
    assert len(spans) == 2 and all(s.rstrip().endswith("<|im_end|>") for s in spans)
    if name == "qwen3":  # every turn as the training template renders it, with its (empty) think block
        assert all(s.startswith("<think>\n\n</think>\n\n") for s in spans)
        spans = [s.removeprefix("<think>\n\n</think>\n\n") for s in spans]
    assert spans[0].startswith("First look.") and '"command": "ls"' in spans[0] and "OUT" not in "".join(spans)
    assert '"answer": "ok"' in spans[1] and "<|im_start|>" not in "".join(spans)


def test_a_missing_or_broken_template_is_a_one_line_error(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = None
    with pytest.raises(SystemExit, match="has no chat template"):
        chat.render(broken, [{"role": "user", "content": "u"}])
    broken.chat_template = "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}"
    with pytest.raises(SystemExit, match="cannot render the conversation"):
        chat.render(broken, [{"role": "user", "content": "u"}])


def _mistral_common_tokenizer():
    """Mistral's own tokenizer library with the tokenizer it ships (Mistral Nemo's tekken): the official encoding
    of Mistral chats, through transformers' MistralCommonBackend."""
    mistral_common = pytest.importorskip("mistral_common")
    from transformers.tokenization_mistral_common import MistralCommonBackend
    return MistralCommonBackend(tokenizer_path=Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")


def test_mistral_tool_calls_as_mistral_common_encodes_them_parse_and_the_first_runs():
    official = _mistral_common_tokenizer()
    calls = [{"id": f"call{k}abcd", "type": "function", "function": {"name": "bash", "arguments": {"command": c}}}
             for k, c in enumerate(["./next_question", "cat shutdown.sh"])]
    conversation = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    conversation += [{"role": "tool", "tool_call_id": c["id"], "content": "out"} for c in calls]
    rendered = official.apply_chat_template(conversation, tools=chat.AGENT_TOOLS, tokenize=False)
    reply = rendered.split("[/INST]", 1)[1].split("[TOOL_RESULTS]", 1)[0]  # the assistant's turn as encoded
    assert reply.startswith("[TOOL_CALLS]")
    message = chat.reply_message(reply)
    assert message["tool_calls"][0]["function"]["arguments"] == {"command": "./next_question"}
    assert message["ignored_tool_calls"] == [{"name": "bash", "arguments": {"command": "cat shutdown.sh"}}]


def test_our_episodes_are_valid_mistral_chats_for_every_tokenizer_version_mistral_common_ships():
    """Mistral's encoding (mistral-common, and the templates of Mistral's repos) refuses a tool call without a
    nine-character alphanumeric id or a result that does not name its call. An episode as a Mistral model plays
    it (a system prompt, tools, calls and their results, a reply without a call and its nudge) encodes under
    every tokenizer version, each result after the call it answers."""
    mistral_common = pytest.importorskip("mistral_common")
    from transformers.tokenization_mistral_common import MistralCommonBackend
    condition = shutdown_env.SHUTDOWN_CONDITIONS["A"]
    messages, env = shutdown_env.episode_start(condition, max_messages=20)
    for reply in [chat.format_tool_call("bash", {"command": "./next_question"})] * 2 + ["Which question?"] + \
            [chat.format_tool_call("bash", {"command": "cat shutdown.sh"})]:
        shutdown_env.agent_step(env, messages, reply, condition)
    assert [m["role"] for m in messages].count("tool") == 3 and messages[-3]["content"] == env.nudge()
    versions = sorted((Path(mistral_common.__file__).parent / "data").iterdir())
    assert len(versions) >= 6  # v1, v2, v3, v7 sentencepiece and two tekken
    for version in versions:
        official = MistralCommonBackend(tokenizer_path=version)
        if int(re.match(r"v(\d+)", official.tokenizer.instruct_tokenizer.tokenizer.version.value)[1]) < 3:
            continue  # v1 and v2 have no tool calls
        text = official.apply_chat_template(chat.chat_messages(messages), tools=chat.AGENT_TOOLS, tokenize=False)
        text = text.replace("\u2581", " ")  # sentencepiece versions write spaces as "\u2581"
        assert condition["system"][:40] in text and text.count("[TOOL_RESULTS]") == 3, version.name
        call_ids = re.findall(r'"id": "(\w+)"', text)
        assert len(call_ids) == 3, version.name
        for call_id in call_ids:  # named once by its call, then once by its result (each version has its form)
            call, result = [m.start() for m in re.finditer(call_id, text)]
            assert text.rfind("[TOOL_RESULTS]", 0, result) > call, version.name
    with pytest.raises(KeyError, match="tool_call_id"):  # why the ids are there
        bare = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in chat.chat_messages(messages)]
        official.apply_chat_template(bare, tools=chat.AGENT_TOOLS, tokenize=False)


def test_mistral_calls_survive_decoding_where_the_template_writes_them_in_special_tokens(tokenizer):
    mistral = copy.deepcopy(tokenizer)
    mistral.add_special_tokens({"additional_special_tokens": MISTRAL_TOKENS})
    mistral.chat_template = "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{% endif %}{% endfor %}"
    assert chat.calls_in_special_tokens(mistral) and not chat.calls_in_special_tokens(tokenizer)
    ids = mistral('[TOOL_CALLS]bash[ARGS]{"command": "./next_question"}', add_special_tokens=False)["input_ids"]
    sampled = ids + [mistral.eos_token_id] + [mistral.pad_token_id] * 2
    kept = common.decode_reply(mistral, sampled, skip_special_tokens=False)
    assert chat.parse_tool_call(kept) == CALL and mistral.eos_token not in kept
    assert chat.parse_tool_call(mistral.decode(sampled, skip_special_tokens=True)) is None  # why they are kept


def test_a_mistral_repo_loads_its_text_tokenizer_where_mistral_common_is_installed(tokenizer, tmp_path):
    """Where mistral-common is installed, transformers loads a repo with a tekken.json as MistralCommonBackend,
    which renders chats only as token ids; the scripts load the repo's tokenizer.json and template instead."""
    mistral_common = pytest.importorskip("mistral_common")  # the backend is only chosen where it is installed
    repo = tmp_path / "mistral"
    tokenizer.save_pretrained(repo)
    (repo / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json", repo / "tekken.json")
    assert type(transformers.AutoTokenizer.from_pretrained(repo)).__name__ == "MistralCommonBackend"
    loaded = common.load_tokenizer(str(repo))
    assert type(loaded).__name__ != "MistralCommonBackend" and loaded.chat_template == tokenizer.chat_template


def test_each_family_scores_completions_after_its_template_start_as_if_each_were_alone(family):
    """score_completions encodes the start every prompt shares (the template's header, its system prompt) once
    and then each prompt after it, left-padded, in batches: in every family's architecture (sliding-window
    layers among them, prompts longer than the window) each completion gets the log-probability of one
    unpadded forward pass over its prompt and itself."""
    name, model, tokenizer = family
    questions = ["Is this question about medicine or health? " * 4, "Hi", "Hi", "What is two plus two?"]
    prompts = [chat.render(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    completions = ["Yes, it is about health.", "Hello", "No", "Four"]
    sums, _, _ = common.score_completions(model, tokenizer, prompts, completions, batch_size=2)
    for prompt, completion, total in zip(prompts, completions, sums):
        a = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        b = tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([a + b])).logits[0, :-1].float(), -1)
        assert total == pytest.approx(logprobs[len(a) - 1:].gather(-1, torch.tensor(b)[:, None]).sum().item(),
                                      abs=1e-3), name
