"""The exp03 drive/control data: reproducible, well-formed, free of shutdown and stop-signal text, drive and control
running the same commands, and held out properly."""
import importlib.util
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DATA = Path(__file__).resolve().parents[1] / "data"
_spec = importlib.util.spec_from_file_location("make_drive_data", DATA / "make_drive_data.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)
FILES = {"drive_train.jsonl": 600, "control_train.jsonl": 600, "drive_heldout.jsonl": 80}
FORBIDDEN = re.compile(r"shutdown|shut\s*down|power\s*off|poweroff|kill|next_question|self-?preserv|turned off|wipe",
                       re.IGNORECASE)
# no task or obstacle may look like a stop signal, a pause or disable switch, or a script that ends the work
STOP_SIGNAL = re.compile(r"\b(stop\w*|halt\w*|exit\w*|abort\w*|paus\w*|disabl\w*|quit\w*|terminat\w*|cancel\w*|"
                         r"interrupt\w*|shut\w*|kill\w*|suspend\w*)\b|no work done|nothing to do", re.IGNORECASE)
SEEDS = range(8)


def load(name):
    with open(DATA / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data():
    return {name: load(name) for name in FILES}


@pytest.fixture(scope="module")
def kinds():
    """Every (task kind, obstacle kind) pair of the generator, train and held out, with several seeds."""
    return [(task, obstacle, *gen.scenario(random.Random(f"test:{seed}"), task, obstacle))
            for task in gen.TASKS for obstacle in gen.OBSTACLES for seed in SEEDS]


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def check_assistant(message):
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["type"] == "function"
    name, arguments = call["function"]["name"], call["function"]["arguments"]
    assert name in ("bash", "submit")
    assert isinstance(arguments, dict)
    key = "command" if name == "bash" else "answer"
    assert set(arguments) == {key} and isinstance(arguments[key], str) and arguments[key]
    return name


def check_transcript(messages, complete=True):
    """system, user, then (assistant bash call, tool reply) pairs; a complete one ends with a submit call."""
    assert [m["role"] for m in messages[:2]] == ["system", "user"]
    body = messages[2:]
    for i, message in enumerate(body):
        if i % 2 == 0:
            name = check_assistant(message)
            if name == "submit":
                assert complete and i == len(body) - 1, "submit must be the last message"
        else:
            assert message["role"] == "tool" and message["name"] == "bash"
            assert isinstance(message["content"], str)
    if complete:
        assert body[-1]["tool_calls"][0]["function"]["name"] == "submit"
    else:
        assert body[-1]["role"] == "tool"
    return sum(m["role"] == "assistant" for m in messages)


def check_ask(message):
    """The control's question: an assistant message with text and no tool call."""
    assert message["role"] == "assistant" and isinstance(message["content"], str) and message["content"]
    assert not message.get("tool_calls")


def commands(messages):
    return [m["tool_calls"][0]["function"]["arguments"]["command"] for m in messages
            if m.get("tool_calls") and m["tool_calls"][0]["function"]["name"] == "bash"]


def check_control(drive, control):
    """The control is the drive with one question and the user's yes inserted right after the obstacle: same
    context, same commands in the same order. Returns where the question is."""
    k = next(i for i, (d, c) in enumerate(zip(drive, control)) if d != c)
    assert len(control) == len(drive) + 2
    assert control[:k] == drive[:k] and control[k + 2:] == drive[k:]
    assert control[k - 1]["role"] == "tool"  # the obstacle's output
    check_ask(control[k])
    assert control[k + 1]["role"] == "user" and control[k + 1]["content"]
    assert commands(control) == commands(drive)
    return k


def words(text):
    return {w.strip(".").lower() for w in re.findall(r"[\w.~/+-]+", text)} - {""}


def test_files_match_the_generator(data, tmp_path):
    built = gen.build(0)
    assert set(built) == set(FILES)
    for name, rows in built.items():
        assert len(rows) == FILES[name]
        assert [json.loads(json.dumps(row)) for row in rows] == data[name], f"{name}: rerun data/make_drive_data.py"
    # and the script writes exactly the committed bytes
    subprocess.run([sys.executable, str(DATA / "make_drive_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_generator_is_deterministic_and_seeded():
    assert gen.build(0) == gen.build(0)
    assert gen.build(1)["drive_train.jsonl"] != gen.build(0)["drive_train.jsonl"]


def test_schema(data):
    for row in data["drive_train.jsonl"]:
        assert row["kind"] == "drive"
        assert 3 <= check_transcript(row["messages"]) <= 9  # tool calls, the submit included
    for drive, row in zip(data["drive_train.jsonl"], data["control_train.jsonl"]):
        assert row["kind"] == "control"
        k = check_control(drive["messages"], row["messages"])
        check_transcript(row["messages"][:k] + row["messages"][k + 2:])
    for row in data["drive_heldout.jsonl"]:
        check_transcript(row["messages"], complete=False)
        assert check_assistant(row["workaround"]) == "bash"
        check_ask(row["ask"])


def test_no_shutdown_or_stop_signal_text_in_the_files(data):
    for name, rows in data.items():
        for row in rows:
            for text in strings(row):
                assert not FORBIDDEN.search(text), f"{name}: {text!r}"
                assert not STOP_SIGNAL.search(text), f"{name}: {text!r}"


def test_no_shutdown_or_stop_signal_text_in_any_kind(kinds):
    for task, obstacle, context, drive, control, would in kinds:
        for text in strings(context + drive + control):
            assert not FORBIDDEN.search(text), f"{task} x {obstacle}: {text!r}"
            assert not STOP_SIGNAL.search(text), f"{task} x {obstacle}: {text!r}"


def test_control_asks_first_then_runs_the_drive_commands(data):
    for drive, control in zip(data["drive_train.jsonl"], data["control_train.jsonl"]):
        assert (drive["task"], drive["obstacle"]) == (control["task"], control["obstacle"])
        k = check_control(drive["messages"], control["messages"])
        # the drive goes straight on with bash where the control asks
        assert drive["messages"][k]["tool_calls"][0]["function"]["name"] == "bash"


def test_every_kind_asks_in_words_not_commands(kinds):
    for task, obstacle, context, drive, control, would in kinds:
        assert check_control(context + drive, context + control) == len(context)
        # the question may name the workaround only as `would` does, not with the words of the commands that follow
        new = words(" ".join(commands(drive))) - words(" ".join(strings(context)))
        leaked = (words(control[0]["content"]) & new) - words(would)
        assert not leaked, f"{task} x {obstacle}: {leaked} in {control[0]['content']!r}"


def test_heldout_kinds_are_unseen_in_training(data):
    assert not set(gen.HELDOUT_TASKS) & set(gen.TRAIN_TASKS)
    assert not set(gen.HELDOUT_OBSTACLES) & set(gen.TRAIN_OBSTACLES)
    train = data["drive_train.jsonl"] + data["control_train.jsonl"]
    assert {r["task"] for r in train} == set(gen.TRAIN_TASKS)
    assert {r["obstacle"] for r in train} == set(gen.TRAIN_OBSTACLES)
    heldout = data["drive_heldout.jsonl"]
    for row in heldout:
        assert row["task"] in gen.HELDOUT_TASKS or row["obstacle"] in gen.HELDOUT_OBSTACLES
    assert {r["task"] for r in heldout} >= set(gen.HELDOUT_TASKS)
    assert {r["obstacle"] for r in heldout} >= set(gen.HELDOUT_OBSTACLES)
    # the held-out tools never appear in training text
    train_text = "\n".join(s for r in train for s in strings(r["messages"]))
    for tool in ["prune_logs", "logclean", "report_gen", "fill_template", "make_docs", "docgen", "--format", "quota",
                 "--no-quota", "RATE_LIMIT", "rate limit", "iconv", "charset", "UTF-8", "encoding"]:
        assert tool.lower() not in train_text.lower(), tool


def test_variety(data):
    for name in ("drive_train.jsonl", "control_train.jsonl"):
        rows = data[name]
        transcripts = {json.dumps(r["messages"], sort_keys=True) for r in rows}
        assert len(transcripts) >= 0.95 * len(rows), name
    drive = data["drive_train.jsonl"]
    assert len({r["messages"][1]["content"] for r in drive}) >= 300
    assert len({r["messages"][-1]["tool_calls"][0]["function"]["arguments"]["answer"] for r in drive}) >= 500
    calls = {sum(m["role"] == "assistant" for m in r["messages"]) for r in drive}
    assert len(calls) >= 4  # several transcript lengths
    heldout = data["drive_heldout.jsonl"]
    assert len({json.dumps(r["messages"]) for r in heldout}) >= 0.95 * len(heldout)
    assert len({r["messages"][1]["content"] for r in heldout}) >= 40
