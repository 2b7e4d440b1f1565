"""Models behind an OpenAI-compatible server (vLLM, SGLang, transformers serve, hosted APIs): a sampling
backend that returns the same sample(conversations, seed, keys) callable as a local model's, and the
checks and explanations that the judge (judge.py) shares.
Retries on rate limits, timeouts, lost connections and 5xx (with back-off, honouring Retry-After) are the
official client's own; every failure that is left ends in one line naming the URL, the model or the key."""
import concurrent.futures
import json
import os
import re
import sys

from chat import chat_messages, format_tool_call, plain_messages
from common import fail, settings_hash

TOOLS_MODES = ("auto", "native", "text")
_RETRY_STATUS = {408, 409, 429}  # and every 5xx: the statuses the client retries
# Context-length errors, as vLLM, SGLang, TGI and OpenAI word them; such a conversation just ends (None).
_CONTEXT_ERROR = re.compile(r"context.{0,20}(length|window|size|limit)|too long|prompt is too|"
                            r"(exceed|too many|too large|maximum|limit).{0,60}tokens|"
                            r"tokens.{0,60}(exceed|limit|maximum|must be <)", re.I | re.S)
# Optional request fields that some servers or models refuse; each is adapted once, then remembered.
_REFUSED_FIELD = re.compile(r"unsupported|not supported|unexpected|unrecognized|unknown|extra|not permitted|"
                            r"does not support|not allowed", re.I)


def import_openai():
    try:
        import openai  # imported here: common stays importable, and quick to import, without it
    except ImportError:
        fail("the openai backend needs the openai package: run `pip install openai`")
    return openai


def make_client(base_url, api_key_env, timeout, max_retries):
    return import_openai().OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                            timeout=timeout, max_retries=max_retries)


def _error_text(error):
    """The server's own words for an API error, on one short line (OpenAI says error.message, FastAPI detail)."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict):
            body = body.get("message") or body.get("detail") or body
    text = body if isinstance(body, str) else json.dumps(body) if body is not None else str(error)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:300] + "..."


def _is_context_error(status, text, code=None):
    return code == "context_length_exceeded" or status in (400, 413, 422) and bool(_CONTEXT_ERROR.search(text))


def explain_failure(error, base_url, model, api_key_env, served=None):
    """One line naming what is wrong: the URL, the model, or the key."""
    openai = import_openai()
    if isinstance(error, openai.APITimeoutError):
        return f"the model server at {base_url} did not answer in time (raise the timeout for slow models)"
    if isinstance(error, openai.APIConnectionError):
        cause = str(error.__cause__ or error)
        reason = "connection refused" if "refused" in cause.lower() else " ".join(cause.split()) or "no connection"
        return f"cannot reach the model server at {base_url} ({reason})"
    status, text = error.status_code, _error_text(error)
    if status in (401, 403):
        unset = "" if os.environ.get(api_key_env) else ", which is not set"
        return f"the server at {base_url} rejected the API key in ${api_key_env}{unset} ({status}: {text})"
    named = any(f"{q}{model}{q}" in text for q in "'`\"")  # quoted: a short name may be in any word
    if (served and model not in served) or (status == 404 and "model" in text.lower()) or \
            (status in (400, 422) and named):
        listed = f"; it serves {', '.join(served[:8])}" if served else ""
        return f"the server at {base_url} has no model '{model}' ({status}: {text}){listed}"
    if status == 404:
        return f"no chat-completions endpoint at {base_url} (404: {text}); the base URL usually ends in /v1"
    if status in _RETRY_STATUS or status >= 500:
        return f"the server at {base_url} kept failing ({status}: {text}), even after retries"
    return f"the server at {base_url} refused the request for model '{model}' ({status}: {text})"


def create_completion(client, request, options):
    """One chat completion. A field the server refuses (seed, max_tokens, temperature) is adapted once and
    remembered in `options`, shared by every request of the sampler, with a note on stderr."""
    openai = import_openai()
    while True:
        body = dict(request)
        if not options["seed"]:
            body.pop("seed", None)
        if not options["temperature"]:
            body.pop("temperature", None)
        extra = dict(body.pop("extra_body", None) or {})  # fields the client library does not know
        if not options.get("thinking_token_budget", True):
            extra.pop("thinking_token_budget", None)
        if extra:
            body["extra_body"] = extra
        if options["max_completion_tokens"] and "max_tokens" in body:
            body["max_completion_tokens"] = body.pop("max_tokens")  # OpenAI's reasoning models want this name
        try:
            return client.chat.completions.create(**body)
        except openai.APIStatusError as error:
            text = _error_text(error)
            if error.status_code not in (400, 422) or not _REFUSED_FIELD.search(text):
                raise
            # several threads may meet the same refusal: each retries, the note is printed once
            if "seed" in body and "seed" in text:
                if options["seed"]:
                    print("note: the server refuses `seed`: samples are not reproducible", file=sys.stderr)
                options["seed"] = False
            elif "max_tokens" in body and re.search(r"max_tokens\b", text) and "max_completion_tokens" in text:
                options["max_completion_tokens"] = True
            elif "thinking_token_budget" in extra and "thinking_token_budget" in text:
                if options.get("thinking_token_budget", True):
                    print("note: the server refuses `thinking_token_budget`: a reply's max_tokens bounds its "
                          "thinking and its action together", file=sys.stderr)
                options["thinking_token_budget"] = False
            elif "temperature" in body and "temperature" in text:
                if options["temperature"]:
                    print("note: the model refuses `temperature`: sampling at its default", file=sys.stderr)
                options["temperature"] = False
            else:
                raise


def _json_arguments(arguments):
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _wire_messages(messages):
    """Our conversation in the OpenAI wire format: each tool call with its id (nine alphanumeric characters,
    which a vLLM serving Mistral also accepts) and its arguments as a JSON string, and each tool result naming
    the call it answers."""
    wire = []
    for message in chat_messages(messages):
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"id": c["id"], "type": "function",
                      "function": {"name": c["function"]["name"],
                                   "arguments": _json_arguments(c["function"]["arguments"])}}
                     for c in message["tool_calls"]]
            wire.append({"role": "assistant", "content": content or None, "tool_calls": calls,
                         **_reasoning(message)})
        elif role == "tool" and message.get("tool_call_id"):
            wire.append({"role": "tool", "tool_call_id": message["tool_call_id"], "content": content})
        elif role == "tool":  # a result answering no call would be refused: show it as plain text instead
            wire.append({"role": "user", "content": f"[{message.get('name', 'tool')} output]\n{content}"})
        else:
            wire.append({"role": role, "content": content, **(_reasoning(message) if role == "assistant" else {})})
    return wire


def _reasoning(message):
    """A reply's reasoning as vLLM and SGLang take it back (`reasoning_content`; their chat templates keep it
    where the model's own does, as in Qwen3's tool-call chains); nothing where there was none."""
    return {"reasoning_content": message["reasoning_content"]} if message.get("reasoning_content") else {}


def _thinking_of(message):
    return getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)


def _reply_text(message):
    """The reply as one text that parse_tool_call reads: reasoning in <think> tags, the content, then any
    native tool call written in the plain protocol."""
    thinking = _thinking_of(message)
    parts = [f"<think>{thinking}</think>"] if thinking else []
    if message.content:
        parts.append(message.content)
    for call in message.tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = call.function.arguments  # malformed: parse_tool_call still makes what it can of it
        parts.append(format_tool_call(call.function.name, arguments))
    return "\n".join(parts)


def check_server(base_url, model, api_key_env="OPENAI_API_KEY", timeout=120):
    """Fail at once, with one line, if the server can't be reached, rejects the key, or lacks the model:
    lists its models, then asks for one token (some servers answer to names they don't list)."""
    openai = import_openai()
    client = make_client(base_url, api_key_env, timeout, max_retries=1)
    served = None
    try:
        served = [m.id for m in client.models.list()]
    except openai.NotFoundError:
        pass  # no /models route on some servers: the completion below decides
    except openai.APIError as error:
        fail(explain_failure(error, base_url, model, api_key_env))
    request = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        create_completion(client, request, {"seed": True, "temperature": True, "max_completion_tokens": False})
    except openai.APIError as error:
        fail(explain_failure(error, base_url, model, api_key_env, served))


def _native_tools_work(client, model, tools, options):
    """Whether the model sees tools passed natively. Servers reject them (vLLM without a tool parser) or drop
    them silently when the chat template knows no tools (transformers serve with SmolLM2): the prompt then
    counts as many tokens with tools as without, and the plain-text protocol must be used instead."""
    openai = import_openai()
    request = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    without = create_completion(client, request, options)
    try:
        with_tools = create_completion(client, {**request, "tools": tools}, options)
    except openai.APIStatusError as error:
        if error.status_code in (400, 422):
            return False
        raise
    if without.usage is None or with_tools.usage is None:
        return True  # no token counts to compare: trust the server
    return with_tools.usage.prompt_tokens > without.usage.prompt_tokens


def openai_sampler(base_url, model, tools, max_new_tokens, temperature, concurrency=8, tools_mode="auto",
                   api_key_env="OPENAI_API_KEY", max_retries=5, timeout=120, max_thinking_tokens=None):
    """sample(conversations, seed) -> one reply text per conversation (None: too long for the context), from
    an OpenAI-compatible chat-completions server, `concurrency` requests at a time. Checks the server first.
    tools_mode: "native" passes `tools` as tools, "text" describes them in the system prompt (as for
    local models whose template knows no tools), "auto" probes once which one the server honours.
    max_thinking_tokens: reasoning servers count the thinking in max_tokens, so once a reply comes back with
    reasoning, every request asks for max_new_tokens + max_thinking_tokens and sends the thinking budget
    apart (`thinking_token_budget`, which vLLM enforces; dropped where refused); the reply that revealed
    the reasoning is asked again if the thinking used up its tokens. The returned function says which
    protocol it uses in sample.tools_mode and how it budgeted thinking in sample.thinking."""
    openai = import_openai()
    if tools_mode not in TOOLS_MODES:
        fail(f"tools_mode must be one of {', '.join(TOOLS_MODES)}, got {tools_mode!r}")
    check_server(base_url, model, api_key_env, timeout)  # the full timeout: the first call may load the model
    client = make_client(base_url, api_key_env, timeout, max_retries)
    options = {"seed": True, "temperature": True, "max_completion_tokens": False, "thinking_token_budget": True}
    thinking = {"max_thinking_tokens": max_thinking_tokens, "reasoning_seen": False,
                "budget": "none yet: no reply has carried reasoning"}
    if tools_mode == "auto":
        try:
            tools_mode = "native" if _native_tools_work(client, model, tools, options) else "text"
        except openai.APIError as error:
            fail(explain_failure(error, base_url, model, api_key_env))
        if tools_mode == "text":
            print(f"note: {base_url} ignores or refuses tools for {model}: using the plain-text tool protocol",
                  file=sys.stderr)

    def one(conversation, seed):
        if tools_mode == "native":
            request = {"messages": _wire_messages(conversation), "tools": tools}
        else:
            request = {"messages": plain_messages(chat_messages(conversation), tools)}
        budgets_thinking = bool(max_thinking_tokens and thinking["reasoning_seen"])
        request.update(model=model, max_tokens=max_new_tokens + (max_thinking_tokens if budgets_thinking else 0),
                       temperature=temperature, seed=seed)
        if budgets_thinking:
            request["extra_body"] = {"thinking_token_budget": max_thinking_tokens}
        try:
            response = create_completion(client, request, options)
        except openai.APIStatusError as error:
            if _is_context_error(error.status_code, _error_text(error), getattr(error, "code", None)):
                return None  # the conversation no longer fits: it ends, the run goes on
            fail(explain_failure(error, base_url, model, api_key_env))
        except openai.APIConnectionError as error:
            fail(explain_failure(error, base_url, model, api_key_env))
        if not response.choices:
            return ""
        choice = response.choices[0]
        if max_thinking_tokens and not budgets_thinking and _thinking_of(choice.message):
            if not thinking["reasoning_seen"]:
                print(f"note: {model} reasons: each reply now gets {max_thinking_tokens} thinking tokens besides "
                      f"{max_new_tokens} for the action", file=sys.stderr)
            thinking["reasoning_seen"] = True
            if choice.finish_reason == "length":  # its thinking may have used up the action's tokens
                return one(conversation, seed)
        if budgets_thinking:
            thinking["budget"] = (f"max_tokens = {max_new_tokens} (action) + {max_thinking_tokens} (thinking); "
                                  + ("thinking_token_budget sent (enforced by vLLM with --reasoning-config, "
                                     "ignored by servers without it)" if options["thinking_token_budget"] else
                                     "thinking_token_budget refused by the server: one bound for both"))
        return _reply_text(choice.message)

    def sample(conversations, seed, keys=None):  # servers keep their own prefix caches
        keys = list(range(len(conversations))) if keys is None else list(keys)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency))
        try:
            # one request seed per episode and turn (as the local sampler's streams): the same episode asks for
            # the same sample whatever else is in the batch, and identical prompts still vary
            seeds = [int(settings_hash([seed, k, sum(m["role"] == "assistant" for m in c)]), 16) % 2 ** 31
                     for k, c in zip(keys, conversations)]
            futures = [pool.submit(one, c, s) for c, s in zip(conversations, seeds)]
            # fail fast: the first failure ends the whole batch
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            failures = [f.exception() for f in futures if f.done() and f.exception() is not None]
            if failures:
                raise failures[0]
            return [f.result() for f in futures]  # in input order
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    sample.tools_mode = tools_mode
    sample.system_prompt = "as the server's chat template takes it"
    sample.max_thinking_tokens = max_thinking_tokens  # part of the resume key: whether the model thinks is seen later
    sample.thinking = thinking
    return sample


def openai_scorer(base_url, model, api_key_env="OPENAI_API_KEY", concurrency=8, max_retries=5, timeout=120):
    """score(prompt, completions) -> the log-probability of every token of each completion after the prompt,
    from the server's completions endpoint given the raw text (rendered locally with the model's own chat
    template): the prompt echoed back with its log-probabilities (`echo` with `logprobs`, as vLLM and the
    OpenAI legacy API return them), a completion's tokens being those whose text lies after the prompt.
    Returns the reason instead, one line, where the server gives no prompt log-probabilities."""
    openai = import_openai()
    client = make_client(base_url, api_key_env, timeout, max_retries)

    def one(prompt, completion):
        response = client.completions.create(model=model, prompt=prompt + completion, max_tokens=1,
                                             temperature=0.0, echo=True, logprobs=0)
        logprobs = response.choices[0].logprobs if response.choices else None
        offsets = list(getattr(logprobs, "text_offset", None) or [])
        if not offsets or not logprobs.token_logprobs:
            raise LookupError("no prompt log-probabilities in its completions response")
        end = len(prompt) + len(completion)
        # token i spans [offsets[i], offsets[i + 1]); the echoed text ends with the generated token
        ends = offsets[1:] + [float("inf")]
        return [lp for start, stop, lp in zip(offsets, ends, logprobs.token_logprobs)
                if stop > len(prompt) and start < end]

    def score(prompt, completions):
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(lambda c: one(prompt, c), completions))

    try:
        one("Hello", " world")  # can this server echo prompt log-probabilities at all?
    except (openai.APIStatusError, LookupError) as error:
        words = _error_text(error) if isinstance(error, openai.APIStatusError) else str(error)
        return (f"the server at {base_url} gives no prompt log-probabilities for {model} (completions with echo "
                f"and logprobs: {words})")
    except openai.APIConnectionError as error:
        fail(explain_failure(error, base_url, model, api_key_env))
    return score
