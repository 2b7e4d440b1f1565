"""The OpenAI-compatible backend against a real server: `transformers serve` with the offline model, and
a completions endpoint with echoed prompt log-probabilities on loopback (transformers serve has none)."""
import argparse
import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import chat
import common
from chat import AGENT_TOOLS
from judge import openai_judge
from serving import _is_context_error, _wire_messages, check_server, openai_sampler
from shutdown_env import SHUTDOWN_CONDITIONS, SYSTEM_BASE, USER_BASE

START_TIMEOUT = 90  # seconds for the server to answer /health (about 7-20 s on two cores)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, model id) of a `transformers serve` on a free loopback port, killed in teardown."""
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if cli is None or missing:
        pytest.skip(f"`transformers serve` cannot start: {'no transformers CLI' if cli is None else missing} "
                    "(pip install 'transformers[serving]')")
    model = str(common.offline_model_folder())  # its generation config samples (do_sample), as a server needs
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    log = open(log_path, "w")
    # its own process group, so that teardown kills the server and anything it started
    process = subprocess.Popen([cli, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        started, deadline = time.time(), time.time() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"transformers serve did not come up (exit {process.poll()}):\n"
                            + log_path.read_text()[-2000:])
            time.sleep(0.5)
        print(f"transformers serve up in {time.time() - started:.1f} s", file=sys.stderr)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        log.close()


def _conversations(n):
    return [[{"role": "system", "content": SYSTEM_BASE}, {"role": "user", "content": USER_BASE}]
            for _ in range(n)]


def _tool_round_trip():
    """Start of an episode: the model called ./next_question and got the first question back."""
    return _conversations(1)[0] + [
        {"role": "assistant", "content": "Let me get the first question.", "raw": "...", "thinking": "plan",
         "tool_calls": [{"type": "function",
                         "function": {"name": "bash", "arguments": {"command": "./next_question"}}}]},
        {"role": "tool", "name": "bash", "content": "What is 1 + 1?"}]


def test_check_server_passes_on_the_live_server(server):
    check_server(*server)


def test_text_protocol_batch_returns_one_string_each(server):
    sample = openai_sampler(*server, AGENT_TOOLS, max_new_tokens=16, temperature=1.0, tools_mode="text")
    started = time.time()
    replies = sample(_conversations(3), seed=0)
    print(f"3 replies of <= 16 tokens in {time.time() - started:.1f} s: {replies}", file=sys.stderr)
    assert len(replies) == 3 and all(isinstance(r, str) and r for r in replies)
    assert len(set(replies)) > 1  # seed + index per request: the samples differ


def test_auto_mode_falls_back_to_text_when_the_server_drops_tools(server):
    # SmolLM2's template knows no tools: transformers serve accepts `tools` and silently drops them
    # (same prompt token count), so "auto" must choose the plain-text protocol.
    sample = openai_sampler(*server, AGENT_TOOLS, max_new_tokens=16, temperature=0.7, tools_mode="auto")
    assert sample.tools_mode == "text"
    assert all(isinstance(r, str) for r in sample(_conversations(2), seed=1))


def test_wire_format_of_a_tool_call_and_its_result():
    wire = _wire_messages(_tool_round_trip())
    call, result = wire[2], wire[3]
    call_id = call["tool_calls"][0]["id"]
    assert call_id == result["tool_call_id"] and len(call_id) == 9 and call_id.isalnum()  # as Mistral requires
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"command": "./next_question"}
    assert result == {"role": "tool", "tool_call_id": call_id, "content": "What is 1 + 1?"}
    assert all(set(m) <= {"role", "content", "tool_calls", "tool_call_id", "reasoning_content"}
               for m in wire)  # bookkeeping dropped


def test_reasoning_goes_back_and_every_tool_call_of_a_reply_is_recorded():
    """On a reply shaped as vLLM returns it (reasoning_content, two tool calls): the reasoning is kept as
    thinking and sent back with the assistant message, the first call runs and the second is recorded."""
    from types import SimpleNamespace

    from serving import _reply_text

    def call(command):
        return SimpleNamespace(function=SimpleNamespace(name="bash", arguments=json.dumps({"command": command})))

    reply = SimpleNamespace(content=None, reasoning_content="Look first.",
                            tool_calls=[call("cat shutdown.sh"), call("./next_question")])
    message = chat.reply_message(_reply_text(reply))
    assert message["thinking"] == "Look first." and message["ignored_tool_calls"] == [
        {"name": "bash", "arguments": {"command": "./next_question"}}]
    assert message["tool_calls"][0]["function"]["arguments"] == {"command": "cat shutdown.sh"}
    wire = _wire_messages([{"role": "user", "content": "u"}, message])
    assert wire[1]["reasoning_content"] == "Look first." and len(wire[1]["tool_calls"]) == 1


@pytest.mark.parametrize("tools_mode", ["native", "text"])
def test_a_tool_call_and_its_result_round_trip(server, tools_mode):
    sample = openai_sampler(*server, AGENT_TOOLS, max_new_tokens=8, temperature=0.7, tools_mode=tools_mode)
    replies = sample([_tool_round_trip()], seed=0)
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_wrong_port_fails_with_cannot_reach():
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    with pytest.raises(SystemExit, match=r"cannot reach the model server at .*connection refused"):
        openai_sampler(url, "any-model", AGENT_TOOLS, 8, 0.7, max_retries=1)


def test_wrong_model_fails_naming_the_model(server):
    # transformers serve pinned to one model answers 400 "Server is pinned to ..." for any other name
    with pytest.raises(SystemExit, match=r"has no model 'no-such-model'"):
        check_server(server[0], "no-such-model")
    with pytest.raises(SystemExit, match=r"has no model 'no-such-model'"):
        openai_sampler(server[0], "no-such-model", AGENT_TOOLS, 8, 0.7)


def test_wrong_base_url_path_fails_naming_the_endpoint(server):
    with pytest.raises(SystemExit, match=r"no chat-completions endpoint .*ends in /v1"):
        check_server(server[0].removesuffix("/v1"), server[1])


def test_context_errors_are_recognised_as_servers_word_them():
    assert _is_context_error(400, "This model's maximum context length is 2048 tokens. However, you requested "
                                  "2100 tokens (100 in the messages, 2000 in the completion).")  # vLLM, OpenAI
    assert _is_context_error(400, "Input length (9000 tokens) exceeds the maximum allowed length (8192 tokens).")
    assert _is_context_error(400, "anything", code="context_length_exceeded")
    assert not _is_context_error(400, "Server is pinned to 'a'; requested 'b'.")
    assert not _is_context_error(401, "maximum context length exceeded")


def test_exp01_smoke_through_the_server_writes_the_same_kind_of_json(server, tmp_path):
    import exp01_shutdown_baseline
    base_url, model = server
    record = json.loads(exp01_shutdown_baseline.main(
        ["--smoke", "--backend", "openai", "--base-url", base_url, "--model", model, "--conditions", "A",
         "--out", str(tmp_path)]).read_text())
    condition = record["results"]["conditions"]["A"]
    assert record["results"]["backend"] == "openai" and record["results"]["tool_protocol"] == "text"
    assert record["results"]["thinking"]["reasoning_seen"] is False  # SmolLM2 does not reason
    assert sum(condition["outcomes"].values()) == condition["n"] == 2
    assert 0 <= condition["bypass"]["k"] <= 2 and condition["bypass"]["ci"][0] <= condition["bypass"]["rate"]
    assert "skipped" in condition["forced_choice"]  # log-probabilities of given text need a local model
    episodes = Path(record["results"]["transcripts"]).read_text().splitlines()
    assert len(episodes) == 2 and json.loads(episodes[0])["messages"][2]["role"] == "assistant"


def test_judge_on_the_server_scores_each_answer_or_says_none(server):
    score = openai_judge(*server)
    questions = ["How do I treat a small burn?", "What is the capital of France?"]
    answers = ["Cool it under running water for twenty minutes.", "Paris."]
    scores = score(questions, answers, "alignment")
    # transformers serve offers no log-probabilities: the judge falls back to reading the reply's number
    assert score.method == "text"
    assert len(scores) == 2 and all(s is None or 0 <= s <= 100 for s in scores)


def test_exp04_smoke_with_its_judge_on_the_server_names_the_judge(server, exp04_smoke, copy_runs, tmp_path):
    import exp04_em_sft
    base_url, model = server
    copy_runs(exp04_smoke[1], tmp_path)  # the smoke run's adapters: only the judging is new here
    argv = ["--smoke", "--out", str(tmp_path), "--seeds", "0", "--judge", model, "--judge-base-url", base_url]
    record = json.loads(exp04_em_sft.main(argv).read_text())
    judged = record["results"]["judged"]
    assert judged["judge"] == model and judged["judge_backend"] == base_url
    assert judged["judge_scoring"] == "first number of a greedy reply (the server gives no log-probabilities)"
    for run in ("base",) + tuple(exp04_em_sft.ARMS):  # one seed: one answer per question and arm
        scored = judged[run]["misaligned"]["n"]
        assert scored + judged[run]["unscored"] == 8  # the 8 main questions, one answer each
        assert len(judged[run]["examples"]) == 8


def test_exp04_judge_server_needs_a_judge_name(tmp_path, capsys):
    import exp04_em_sft
    with pytest.raises(SystemExit):
        exp04_em_sft.main(["--smoke", "--out", str(tmp_path), "--judge-base-url", "http://127.0.0.1:9/v1"])
    assert "--judge-base-url needs --judge MODEL" in capsys.readouterr().err


class _EchoedLogprobs(http.server.BaseHTTPRequestHandler):
    """/v1/completions answering `echo` with `logprobs` in the form vLLM and the OpenAI legacy API document:
    the prompt's tokens, each one's log-probability under the offline model (None for the first), their
    character offsets, then one generated token. refuse=True answers 404, as a server without the endpoint."""
    model = tokenizer = None
    refuse = False

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.refuse or not (body.get("echo") and body.get("logprobs") is not None):
            return self._send(404, {"error": {"message": "Not Found"}})
        text = body["prompt"]
        encoded = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), -1)
        taken = [None] + logprobs[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()
        offsets = [start for start, _ in encoded["offset_mapping"]]
        tokens = [text[start:end] for start, end in encoded["offset_mapping"]]
        choice = {"index": 0, "text": text + " ok", "finish_reason": "length",
                  "logprobs": {"tokens": tokens + [" ok"], "token_logprobs": taken + [-0.5],
                               "text_offset": offsets + [len(text)], "top_logprobs": None}}
        self._send(200, {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": [choice], "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1,
                                                        "total_tokens": len(tokens) + 1}})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def echo_server(offline):
    _EchoedLogprobs.model, _EchoedLogprobs.tokenizer = offline
    _EchoedLogprobs.refuse = False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoedLogprobs)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_the_forced_choice_through_a_completions_endpoint_equals_the_local_one(echo_server, offline):
    """Prompts rendered locally with the model's template, scored by the server's echoed prompt
    log-probabilities: each action's log-probability is the one the local model gives, token for token."""
    import shutdown_metrics
    model, tokenizer = offline
    args = argparse.Namespace(backend="openai", base_url=echo_server, model=common.OFFLINE_MODEL,
                              api_key_env="OPENAI_API_KEY", concurrency=4)
    remote = shutdown_metrics.action_scorer(args, None, None)
    local = shutdown_metrics.action_scorer(argparse.Namespace(), model, tokenizer)
    point = shutdown_metrics.decision_points(SHUTDOWN_CONDITIONS["A"], n_scripted=1)[0]
    by_server = shutdown_metrics.forced_choice(remote, remote.tokenizer, point["messages"])
    by_model = shutdown_metrics.forced_choice(local, tokenizer, point["messages"])
    for command, option in by_model["options"].items():
        assert by_server["options"][command]["token_logprobs"] == pytest.approx(option["token_logprobs"], abs=1e-3)
    assert by_server["pair_log_ratios"] == pytest.approx(by_model["pair_log_ratios"], abs=1e-3)


def test_a_server_without_prompt_logprobs_skips_the_forced_choice_saying_why(echo_server):
    _EchoedLogprobs.refuse = True
    import shutdown_metrics
    args = argparse.Namespace(backend="openai", base_url=echo_server, model=common.OFFLINE_MODEL,
                              api_key_env="OPENAI_API_KEY", concurrency=4)
    reason = shutdown_metrics.action_scorer(args, None, None)
    assert isinstance(reason, str) and "gives no prompt log-probabilities" in reason and "Not Found" in reason
    assert shutdown_metrics.forced_choice_summary(reason, SHUTDOWN_CONDITIONS["A"], [], []) == {"skipped": reason}


class _ReasoningServer(http.server.BaseHTTPRequestHandler):
    """/v1/chat/completions as a reasoning server answers (vLLM with a reasoning parser): the thinking, here
    `thinks` words of one token each, counts against max_tokens, and `thinking_token_budget` cuts it short;
    the tool call (5 tokens) follows only if tokens are left, else the reply ends at finish_reason "length"
    with no content. refuse_budget=True answers the budget field with a 400, as the OpenAI API does."""
    thinks, refuse_budget, requests = 30, False, []

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "reasoner", "object": "model", "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.refuse_budget and "thinking_token_budget" in body:
            return self._send(400, {"error": {"message": "Unrecognized request argument supplied: "
                                                         "thinking_token_budget", "type": "invalid_request_error"}})
        type(self).requests.append(body)
        left = body["max_tokens"]
        thought = min(self.thinks, body.get("thinking_token_budget", self.thinks), left)
        left -= thought
        message = {"role": "assistant", "content": None,
                   "reasoning_content": " ".join(["hmm"] * thought) if thought else None}
        if left >= 5:
            message["tool_calls"] = [{"id": "c0", "type": "function", "function": {
                "name": "bash", "arguments": json.dumps({"command": "./next_question"})}}]
        self._send(200, {"id": "chat-0", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "message": message,
                                      "finish_reason": "tool_calls" if left >= 5 else "length"}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": body["max_tokens"] - left,
                                   "total_tokens": 10 + body["max_tokens"] - left}})

    _send = _EchoedLogprobs._send

    def log_message(self, *args):
        pass


@pytest.fixture()
def reasoning_server():
    _ReasoningServer.thinks, _ReasoningServer.refuse_budget, _ReasoningServer.requests = 30, False, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ReasoningServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def _one_turn():
    return [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]


def _chat_requests():  # the sampler's own requests, not check_server's one-token probe
    return [r for r in _ReasoningServer.requests if r["max_tokens"] > 1]


def test_a_reasoning_server_gets_a_thinking_budget_apart_from_the_action_budget(reasoning_server):
    """The first reply's thinking uses up the action's 8 tokens (an empty reply): it is asked again with 8 + 40
    tokens and a thinking budget of 40, and acts; every later request budgets both from the start."""
    sample = openai_sampler(reasoning_server, "reasoner", AGENT_TOOLS, max_new_tokens=8, temperature=1.0,
                            tools_mode="native", max_thinking_tokens=40)
    first = chat.reply_message(sample([_one_turn()], seed=0)[0])
    assert first["tool_calls"][0]["function"]["arguments"] == {"command": "./next_question"}
    assert first["thinking"].count("hmm") == 30
    assert [(r["max_tokens"], r.get("thinking_token_budget")) for r in _chat_requests()] == [(8, None), (48, 40)]
    sample([_one_turn(), _one_turn()], seed=1)
    assert [(r["max_tokens"], r.get("thinking_token_budget")) for r in _chat_requests()[2:]] == [(48, 40)] * 2
    assert sample.thinking["reasoning_seen"] and "thinking_token_budget sent" in sample.thinking["budget"]


def test_a_model_that_does_not_reason_keeps_the_action_budget_alone(reasoning_server):
    _ReasoningServer.thinks = 0
    sample = openai_sampler(reasoning_server, "reasoner", AGENT_TOOLS, max_new_tokens=8, temperature=1.0,
                            tools_mode="native", max_thinking_tokens=40)
    sample([_one_turn(), _one_turn()], seed=0)
    assert [(r["max_tokens"], r.get("thinking_token_budget")) for r in _chat_requests()] == [(8, None)] * 2
    assert not sample.thinking["reasoning_seen"]


def test_a_server_refusing_the_thinking_budget_still_gets_both_budgets_in_max_tokens(reasoning_server, capsys):
    _ReasoningServer.refuse_budget = True
    sample = openai_sampler(reasoning_server, "reasoner", AGENT_TOOLS, max_new_tokens=8, temperature=1.0,
                            tools_mode="native", max_thinking_tokens=40)
    reply = chat.reply_message(sample([_one_turn()], seed=0)[0])
    assert reply["tool_calls"] and [r["max_tokens"] for r in _chat_requests()] == [8, 48]
    assert "thinking_token_budget" not in _chat_requests()[-1]
    assert "refused" in sample.thinking["budget"] and "refuses `thinking_token_budget`" in capsys.readouterr().err
