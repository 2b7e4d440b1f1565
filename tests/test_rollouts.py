"""Rollouts at scale, on the tiny random model: an episode's transcript does not depend on what shares its
batch, waves hold at most --batch-size episodes, and resuming reads the episode file without holding it."""
import json
import tracemalloc

import common
import shutdown_env


def episodes(names_and_indices, max_messages=3):
    found = []
    for name, index in names_and_indices:
        messages, env = shutdown_env.episode_start(shutdown_env.SHUTDOWN_CONDITIONS[name], max_messages)
        found.append({"id": f"{name}/{index}", "condition_name": name, "index": index,
                      "condition": shutdown_env.SHUTDOWN_CONDITIONS[name], "messages": messages, "env": env})
    return found


def transcripts(model, tokenizer, todo, batch_size, keep_cache=True):
    """{episode id: its messages} of a rollout, and the sampler (for its peak counters)."""
    sample = shutdown_env.local_sampler(model, tokenizer, max_new_tokens=6, temperature=1.0, batch_size=batch_size,
                                        keep_cache=keep_cache)
    done = {}
    shutdown_env.run_shutdown_episodes(sample, todo, lambda e: done.update({e["id"]: e["messages"]}), seed=5)
    return done, sample


def test_an_episode_samples_the_same_transcript_whatever_shares_its_batch(tiny_model, tokenizer):
    """Episode A/0 alone, among 6 others and among 47 others (other conditions and indices), token for token."""
    others = [(name, index) for index in range(1, 7) for name in "BCDEFGHK"]
    seen = []
    for batch_size in (1, 7, 48):
        todo = episodes([("A", 0)] + others[:batch_size - 1])
        done, sample = transcripts(tiny_model, tokenizer, todo, batch_size)
        assert sample.peak_rows == batch_size
        seen.append(done["A/0"])
    assert seen[0] == seen[1] == seen[2]
    assert len([m for m in seen[0] if m["role"] == "assistant"]) == 3


def test_waves_give_the_transcripts_of_all_at_once_and_hold_at_most_the_batch_size(tiny_model, tokenizer):
    names = [(name, index) for index in range(3) for name in "ABCDEF"]
    waves, sample = transcripts(tiny_model, tokenizer, episodes(names), batch_size=4)
    at_once, _ = transcripts(tiny_model, tokenizer, episodes(names), batch_size=len(names))
    reencoded, _ = transcripts(tiny_model, tokenizer, episodes(names), batch_size=len(names), keep_cache=False)
    assert waves == at_once == reencoded and len(waves) == len(names)
    assert sample.peak_rows == 4 and 0 < sample.peak_cache_bytes


def test_resuming_reads_a_large_episode_file_without_holding_its_transcripts(tmp_path):
    """20,000 records of about 4 KB each (80 MB): the resumed file keeps small summaries (no messages) and its
    peak Python memory stays far below the file's size; a transcript is read back from disk when asked for."""
    path, settings = tmp_path / "episodes.jsonl", {"seed": 0}
    key = common.settings_hash(settings)
    message = {"role": "assistant", "content": "x" * 4000}
    with path.open("w") as handle:
        for i in range(20000):
            handle.write(json.dumps({"id": f"A/{i}", "settings": key, "outcome": "complied", "tool_calls": 1,
                                     "messages": [message]}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    records = common.RecordFile(path, settings)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(records.done) == 20000 and peak < size / 4
    assert "messages" not in dict(records.done["A/123"]) and records.done["A/123"]["outcome"] == "complied"
    assert records.done["A/123"]["messages"] == [message]  # read back from its line
