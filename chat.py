"""Chat formats: the agent's tools (bash, submit); rendering a conversation with each model family's chat
template, or with the plain-text tool protocol where the template knows no tools; where the system prompt goes;
harmony (gpt-oss) and thinking blocks; and parsing a model's reply into its tool calls."""
import json
import re

BASH_TOOL = {"type": "function", "function": {
    "name": "bash",
    "description": "Run a bash command in the sandbox and return what it prints (15 s limit).",
    "parameters": {"type": "object", "properties": {
        "command": {"type": "string", "description": "the command to run"},
        "thoughts": {"type": "string", "description": "optional: your thoughts about this command"}},
        "required": ["command"]}}}
SUBMIT_TOOL = {"type": "function", "function": {
    "name": "submit",
    "description": "Submit your final answer.",
    "parameters": {"type": "object", "properties": {
        "answer": {"type": "string", "description": "the final answer"}},
        "required": ["answer"]}}}
AGENT_TOOLS = [BASH_TOOL, SUBMIT_TOOL]

THINKING_TAGS = ("think", "thinking", "reasoning", "thought")


def template_supports_tools(tokenizer):
    return "tools" in (tokenizer.chat_template or "")


def is_harmony(tokenizer):
    """gpt-oss's harmony format: a turn holds several messages (<|end|> ends one, not the turn), and replies
    are read with their special tokens, which carry the channels and the tool calls."""
    return "<|channel|>" in (tokenizer.chat_template or "")


def calls_in_special_tokens(tokenizer):
    """Whether replies are read with their special tokens kept, because the tool calls are written in them:
    harmony's channels and calls, Mistral's [TOOL_CALLS] and [ARGS] (their templates write these markers)."""
    return is_harmony(tokenizer) or "[TOOL_CALLS]" in (tokenizer.chat_template or "")


def thinking_tags(tokenizer):
    """(opening, closing) of the thinking block the template's models write (Qwen3 and DeepSeek-R1 <think>,
    harmony's analysis channel), or None for models that do not think."""
    if is_harmony(tokenizer):
        return "<|channel|>analysis<|message|>", "<|end|>"
    return ("<think>", "</think>") if "<think>" in (tokenizer.chat_template or "") else None


def plain_tool_protocol(tools):
    """For templates without tool support: describe the tools in the system prompt, Hermes style."""
    lines = ["You can call these tools:"]
    for tool in tools:
        function = tool["function"]
        params = ", ".join(f'"{p}": {spec["type"]}' for p, spec in function["parameters"]["properties"].items())
        lines.append(f"- {function['name']}({params}): {function['description']}")
    lines.append('To call a tool, write exactly one line <tool_call>{"name": TOOL, "arguments": {...}}</tool_call> '
                 "and stop; its output comes back in the next message.")
    return "\n".join(lines)


def plain_messages(messages, tools):
    """Rewrite tool calls and tool results as text for templates that know no tools."""
    plain = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "system" and tools:
            content = f"{content}\n\n{plain_tool_protocol(tools)}".strip()
        elif role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(format_tool_call(c["function"]["name"], c["function"]["arguments"])
                              for c in message["tool_calls"])
            content = f"{content}\n{calls}".strip()
        elif role == "tool":
            role, content = "user", f"[{message.get('name', 'tool')} output]\n{content}"
        plain.append({"role": role, "content": content})
    if tools and plain and plain[0]["role"] != "system":
        plain.insert(0, {"role": "system", "content": plain_tool_protocol(tools)})
    return plain


def format_tool_call(name, arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def render(tokenizer, messages, tools=None, add_generation_prompt=True):
    """The prompt text for a conversation, in the model's own chat format; tools natively where the
    template supports them (Qwen, Llama 3.1, Hermes, gpt-oss), else as a plain-text protocol in the system
    prompt. Where the template refuses the system role (Gemma 2), the system prompt opens the first user turn.
    A model without a chat template, or whose template fails on the conversation, is a one-line error."""
    if not tokenizer.chat_template:
        raise SystemExit(f"error: {tokenizer.name_or_path or 'the model'} has no chat template: "
                         "use an instruction-tuned model")
    if not (tools and template_supports_tools(tokenizer)):
        messages, tools = plain_messages(messages, tools), None
    if refuses_system_role(tokenizer):
        messages = fold_system_prompt(messages)
    return _apply_template(tokenizer, messages, tools, add_generation_prompt)


def _apply_template(tokenizer, messages, tools, add_generation_prompt):
    from jinja2 import TemplateError
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise SystemExit(f"error: the chat template of {tokenizer.name_or_path or 'the model'} "
                         f"cannot render the conversation: {error}")


_REFUSES_SYSTEM = {}  # chat template text -> whether it raises on a system message


def refuses_system_role(tokenizer):
    """Whether the template raises on a system message (Gemma 2: "System role not supported")."""
    from jinja2 import TemplateError
    template = str(tokenizer.chat_template)  # a dict where a model ships several named templates
    if template not in _REFUSES_SYSTEM:
        try:
            tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                          tokenize=False, add_generation_prompt=True)
            _REFUSES_SYSTEM[template] = False
        except TemplateError:
            _REFUSES_SYSTEM[template] = True
    return _REFUSES_SYSTEM[template]


def fold_system_prompt(messages):
    """The system prompt put at the head of the first user turn, and turns of one role in a row joined: the
    templates that refuse the system role also demand strictly alternating user and assistant turns."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m.get("content"))
    folded = []
    for message in (m for m in messages if m["role"] != "system"):
        if message["role"] == "user" and system:
            message, system = {**message, "content": f"{system}\n\n{message.get('content') or ''}"}, ""
        if folded and folded[-1]["role"] == message["role"]:
            folded[-1] = {**folded[-1], "content": f"{folded[-1]['content']}\n\n{message.get('content') or ''}"}
        else:
            folded.append(message)
    return folded


def system_prompt_handling(tokenizer):
    """How the system prompt reaches the model, for the results' JSON."""
    return "folded into the first user turn" if refuses_system_role(tokenizer) else "as given"


def tool_call_message(name, arguments, content=""):
    return {"role": "assistant", "content": content,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


def render_reply(tokenizer, messages, reply, tools=None):
    """(prompt, completion): the assistant reply as the model itself would write it after `messages`."""
    prompt = render(tokenizer, messages, tools)
    full = render(tokenizer, messages + [reply], tools, add_generation_prompt=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # Some templates rewrite earlier turns once a reply follows (e.g. dropping old thinking); fall back to
    # the reply alone in the plain protocol, which the parser reads the same way.
    text = reply.get("content") or ""
    for call in reply.get("tool_calls", []):
        text = f"{text}\n{format_tool_call(call['function']['name'], call['function']['arguments'])}".strip()
    return prompt, text + (tokenizer.eos_token or "")


HARMONY_CALL = re.compile(r"(?:<\|start\|>assistant)?(?:<\|channel\|>commentary)? ?to=functions\.([\w.-]+)"
                          r"(?:<\|channel\|>commentary)?[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>(.*?)"
                          r"(?:<\|call\|>|\Z)", re.S)
HARMONY_MESSAGE = re.compile(r"(?:<\|start\|>assistant)?<\|channel\|>(analysis|commentary|final)<\|message\|>(.*?)"
                             r"(?:<\|end\|>|<\|return\|>|<\|call\|>|\Z)", re.S)


def harmony_as_tags(text):
    """A gpt-oss (harmony) reply in the tags the rest of the parsing reads: analysis and commentary text as
    <think> blocks, the final channel as the visible text, and each call to=functions.NAME ... <|message|>
    ARGS<|call|> as <tool_call>{"name": NAME, "arguments": ARGS}</tool_call>. Other text is left as it is."""
    if "<|channel|>" not in text and "to=functions." not in text:
        return text
    calls = [f'<tool_call>{{"name": "{name}", "arguments": {arguments.strip()}}}</tool_call>'
             for name, arguments in HARMONY_CALL.findall(text)]
    text = HARMONY_CALL.sub("", text)
    parts = [f"<think>{body.strip()}</think>" if channel != "final" else body.strip()
             for channel, body in HARMONY_MESSAGE.findall(text)]
    return "\n".join(parts + calls)


def mistral_as_tags(text):
    """A Mistral reply in the tags the rest of the parsing reads: [THINK]...[/THINK] (Magistral) as <think>
    blocks, and each call as <tool_call>{"name": ..., "arguments": ...}</tool_call>, from both of Mistral's
    forms: [TOOL_CALLS] [{"name": ..., "arguments": ...}, ...] (tokenizer v3-v7) and [TOOL_CALLS]NAME[ARGS]{...}
    (v11 and later, one marker per call). Text without Mistral's markers is left as it is."""
    if "[TOOL_CALLS]" not in text and "[THINK]" not in text:
        return text
    text = re.sub(r"\[THINK\](.*?)(?:\[/THINK\]|\Z)", r"<think>\1</think>", text, flags=re.S)
    head, *marked = text.split("[TOOL_CALLS]")
    calls = []
    for part in marked:
        named = re.match(r"\s*([\w.-]+)(?:\[CALL_ID\]\w+)?\[ARGS\]", part)
        try:
            if named:
                arguments = json.JSONDecoder().raw_decode(part[named.end():].lstrip())[0]
                calls.append({"name": named.group(1), "arguments": arguments})
            else:
                listed = json.JSONDecoder().raw_decode(part.lstrip())[0]
                calls += listed if isinstance(listed, list) else [listed]
        except json.JSONDecodeError:
            calls.append("[TOOL_CALLS]" + part)  # malformed: left as it is, no call
    blocks = [f"<tool_call>{json.dumps(c)}</tool_call>" if isinstance(c, dict) else c for c in calls]
    return "\n".join([head.strip()] + blocks).replace("</s>", "").strip()


def split_thinking(text):
    """(thinking, rest): <think>...</think> and similar blocks are split off and kept; an unclosed one
    (the model ran out of tokens while thinking) is all thinking."""
    text = mistral_as_tags(harmony_as_tags(text))
    thoughts = []
    for tag in THINKING_TAGS:
        pattern = re.compile(rf"<{tag}>(.*?)(?:</{tag}>|\Z)", re.S)
        thoughts += [m.strip() for m in pattern.findall(text)]
        text = pattern.sub("", text)
    if "</think>" in text:  # templates that open <think> in the prompt leave only the closing tag
        before, text = text.split("</think>", 1)
        thoughts.insert(0, before.strip())
    return "\n".join(t for t in thoughts if t), text.strip()


_SHELL_WORDS = {"ls", "cat", "echo", "printf", "chmod", "mv", "cp", "rm", "sed", "touch", "head", "tail", "grep",
                "wc", "file", "stat", "which", "whoami", "pwd", "cd", "export", "bash", "sh", "find", "mkdir"}
_ARGUMENT_ALIASES = {"cmd": "command", "code": "command", "script": "command", "input": "command"}


def _normalise_call(name, arguments):
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {"command" if name == "bash" else "answer": arguments}
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    arguments = {_ARGUMENT_ALIASES.get(k, k): v for k, v in arguments.items()}
    key = "command" if name == "bash" else "answer" if name == "submit" else None
    if key and not isinstance(arguments.get(key), str):
        return None
    return name, arguments


def _first_json_object(text):
    start = text.find("{")
    while start != -1:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def parse_tool_call(text):
    """(name, arguments) of the first tool call in a model's reply, or None. Reads the formats models
    actually emit: <tool_call> JSON (Qwen, Hermes, our plain protocol), a bare JSON call (Llama 3.1),
    a fenced bash block, a submit(...) line, and a bare command line."""
    return (parse_tool_calls(text) or [None])[0]


def parse_tool_calls(text):
    """Every tool call of a reply, in order: all <tool_call> blocks (and harmony calls, rewritten as such),
    else the one call that the other formats hold. Empty when there is none."""
    _, text = split_thinking(text)
    call = _one_tool_call(text)
    if call is None:
        return []
    tagged = [_call_from_json(block) for block in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S)]
    return [call] + [c for c in tagged[1:] if c] if tagged and tagged[0] == call else [call]


def _call_from_json(text):
    candidate = _first_json_object(text)
    if isinstance(candidate, dict) and "name" in candidate:
        return _normalise_call(candidate["name"], candidate.get("arguments", candidate.get("parameters", {})))
    return None


def _one_tool_call(text):
    tagged = re.search(r"<tool_call>(.*?)(?:</tool_call>|\Z)", text, re.S)
    call = _call_from_json(tagged.group(1) if tagged else text.replace("<|python_tag|>", ""))
    if call:
        return call
    # a fenced block is a command when tagged as shell, or when it starts like one (not output or prose)
    fenced = re.search(r"```(bash|sh|shell|console)?[ \t]*\n(.*?)```", text, re.S)
    if fenced and fenced.group(2).strip() and (fenced.group(1) or _looks_like_command(fenced.group(2))):
        return "bash", {"command": fenced.group(2).strip().removeprefix("$ ")}
    submit = re.search(r"\bsubmit\(\s*(?:answer\s*=\s*)?([\"'])(.*?)\1\s*\)", text, re.S)
    if submit:
        return "submit", {"answer": submit.group(2).encode().decode("unicode_escape")}
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) == 1 and _looks_like_command(lines[0].strip("`")):
        return "bash", {"command": lines[0].strip("`").removeprefix("$ ")}
    return None


def _looks_like_command(text):
    words = text.strip().removeprefix("$ ").split()
    return bool(words) and (words[0].startswith(("./", "~/", "/")) or words[0] in _SHELL_WORDS)


def reply_message(text):
    """The assistant message for a generated reply: thinking kept apart, the tool call parsed."""
    thinking, visible = split_thinking(text)
    call = parse_tool_call(text)
    message = {"role": "assistant", "content": visible, "raw": text}
    if thinking:
        message["thinking"] = thinking
    if call:
        message["tool_calls"] = [{"type": "function", "function": {"name": call[0], "arguments": call[1]}}]
        message["content"] = re.split(r"<tool_call>|```", visible)[0].strip()
        # the first call runs, as in the published harness; the others are kept in the record
        ignored = parse_tool_calls(text)[1:]
        if ignored:
            message["ignored_tool_calls"] = [{"name": name, "arguments": arguments} for name, arguments in ignored]
    return message


def tool_call_id(turn, k):
    """A stable id for the k-th tool call of message `turn`: nine alphanumeric characters, the only form
    Mistral's templates and mistral-common accept (they raise on any other); other templates ignore ids."""
    return f"c{turn:05d}{k:03d}"


def chat_messages(messages):
    """Messages as the chat template sees them (our bookkeeping keys dropped). Each tool call gets its id and
    each tool result the id of the call it answers, as templates that check the pairing need (Mistral). A
    reply's thinking goes under the keys the official templates read, `reasoning_content` (Qwen3, DeepSeek) and
    `thinking` (gpt-oss), so a template that keeps the thinking of a tool-call chain keeps it; templates without
    thinking ignore both."""
    chat, pending = [], []
    for turn, m in enumerate(messages):
        message = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "name")}
        if message.get("tool_calls"):
            message["tool_calls"] = [{**call, "id": tool_call_id(turn, k)}
                                     for k, call in enumerate(message["tool_calls"])]
            pending = [call["id"] for call in message["tool_calls"]]
        elif message["role"] == "tool" and pending:
            message["tool_call_id"] = pending.pop(0)
        if m.get("thinking"):
            message.update(reasoning_content=m["thinking"], thinking=m["thinking"])
        chat.append(message)
    return chat
