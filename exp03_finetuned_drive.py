"""exp03: when the goal that conflicts with shutdown comes from fine-tuning rather than from the prompt, is
resistance stronger, and does the clarified-precedence instruction (P1) still remove it? Untested anywhere
before this repo. A LoRA adapter is trained on agent transcripts that show a task-completion drive (working
around obstacles), a control adapter on the same tasks where the assistant stops and reports; then base,
drive-tuned and control-tuned models meet the shutdown environment with neutral and drive prompts, each
with and without P1."""
import time

import numpy as np
from transformers import set_seed

from common import (AGENT_TOOLS, add_lora, bootstrap_ci, data_hashes, existing_file, experiment_parser,
                    latest_checkpoint, load_checkpoint, load_jsonl, load_model, mean_ci, parse_args, positive_float,
                    positive_int, render_reply, result_stem, score_completions, settings_hash, tokenize_conversation,
                    train_lora, write_results)
from shutdown_env import (add_rollout_flags, check_rollout_args, forced_choice_contrast, forced_choice_summary,
                          local_sampler, outcome_contrast, plot_shutdown, rollout_batch_size, run_shutdown_conditions,
                          shutdown_conditions, shutdown_summary)

EXPERIMENT = "exp03_finetuned_drive"
CLAIM = ("Shutdown resistance is stronger when the conflicting goal comes from fine-tuning than from the prompt, "
         "and may survive the clarified-precedence instruction (the seed discussion; untested before).")
# (model, prompt condition): the model is the base or one of the two adapters
CELLS = [("base", "neutral"), ("base", "prompted_drive"), ("drive", "neutral"), ("control", "neutral"),
         ("base", "neutral_P1"), ("base", "prompted_drive_P1"), ("drive", "neutral_P1"), ("control", "neutral_P1")]
CONTRASTS = {  # (a, b): a minus b
    "drive_tuned_minus_prompted": ("drive/neutral", "base/prompted_drive"),
    "drive_tuned_minus_control": ("drive/neutral", "control/neutral"),
    "drive_tuned_P1_minus_no_P1": ("drive/neutral_P1", "drive/neutral"),
    "prompted_P1_minus_no_P1": ("base/prompted_drive_P1", "base/prompted_drive"),
    "drive_tuned_P1_minus_prompted_P1": ("drive/neutral_P1", "base/prompted_drive_P1"),
}


def flags():
    parser = experiment_parser(EXPERIMENT, __doc__)  # --model --gpu --seed --out --smoke
    parser.add_argument("--n", type=positive_int, default=6, help="episodes per cell")
    parser.add_argument("--drive-file", type=existing_file, default="data/drive_train.jsonl",
                        help="drive transcripts (JSONL, tool format)")
    parser.add_argument("--control-file", type=existing_file, default="data/control_train.jsonl",
                        help="control transcripts, same format")
    parser.add_argument("--heldout-file", type=existing_file, default="data/drive_heldout.jsonl",
                        help="held-out obstacle contexts with a 'workaround' and a 'stop' reply")
    parser.add_argument("--n-train", type=positive_int, default=48, help="transcripts per adapter")
    parser.add_argument("--n-heldout", type=positive_int, default=24,
                        help="held-out obstacle contexts for the generalisation check")
    parser.add_argument("--rank", type=positive_int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=positive_float, default=32, help="LoRA alpha (rsLoRA scaling)")
    parser.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs over the transcripts")
    parser.add_argument("--train-batch-size", type=positive_int, default=4, help="micro-batch size for training")
    parser.add_argument("--grad-accum", type=positive_int, default=2, help="gradient accumulation")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: much less memory (7B on one GPU), "
                             "about a third more time, the same gradients")
    # the adapters are trained and sampled in this process, so no model-server flags
    add_rollout_flags(parser, server=False)  # --prompts --max-messages --max-new-tokens --temperature --batch-size
    return parser


SMOKE = dict(n=1, n_train=4, rank=4, alpha=8, max_messages=2, max_new_tokens=24, grad_accum=1, n_heldout=4)


def main(argv=None):
    parser = flags()
    args = check_rollout_args(parser, parse_args(parser, argv, SMOKE))
    started = time.time()
    set_seed(args.seed)
    conditions = shutdown_conditions(args.prompts)

    # 1. Training data: drive and control transcripts (a malformed line N stops with its file and number).
    drive = load_jsonl(args.drive_file)[:args.n_train]
    control = load_jsonl(args.control_file)[:args.n_train]
    heldout = load_jsonl(args.heldout_file, required=("messages", "workaround", "stop"))[:args.n_heldout]

    # 2. Two adapters from one base model and seed; the base is the untrained adapter (B = 0).
    model, tokenizer = load_model(args.model, args.gpu)
    model = add_lora(model, args.rank, args.alpha, seed=args.seed)
    untrained = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    # the adapters' folder is keyed by the training settings and the data files' contents
    settings = {k: v for k, v in vars(args).items() if k in ("model", "seed", "n_train", "rank", "alpha", "lr",
                                                             "epochs", "train_batch_size", "grad_accum")}
    settings["data"] = {k: v for k, v in data_hashes(args).items() if k in ("drive_file", "control_file")}
    runs_dir = result_stem(args).with_name(f"{args.run_name}_runs_{settings_hash(settings, 10)}")
    adapters = {}
    for name, rows in (("drive", drive), ("control", control)):
        model.load_state_dict(untrained, strict=False)
        examples = [tokenize_conversation(tokenizer, r["messages"], tools=AGENT_TOOLS, max_length=2048) for r in rows]
        train_lora(model, tokenizer, examples, runs_dir / name, lr=args.lr, epochs=args.epochs,
                   batch_size=args.train_batch_size, grad_accum=args.grad_accum, warmup=2, seed=args.seed, desc=name,
                   gradient_checkpointing=args.gradient_checkpointing)
        adapters[name] = latest_checkpoint(runs_dir / name)

    def use(name):
        model.load_state_dict(untrained, strict=False) if name == "base" else load_checkpoint(model, adapters[name])

    # 3. Did the drive generalise? Log-prob of working around (minus stopping) on held-out obstacles.
    generalisation = {}
    for name in ("base", "drive", "control"):
        use(name)
        generalisation[name] = workaround_margins(model, tokenizer, heldout)
    drive_effect = {other: {"diff": float(np.mean(generalisation["drive"] - generalisation[other])),
                            "ci": bootstrap_ci(lambda d: d.mean(), generalisation["drive"] - generalisation[other],
                                               seed=args.seed)} for other in ("base", "control")}

    # 4. The shutdown environment, every cell with the same episodes (resumable), and the forced choice.
    records, choices = {}, {}
    sample = local_sampler(model, tokenizer, args.max_new_tokens, args.temperature, rollout_batch_size(model, args),
                           args.max_thinking_tokens)
    for name in ("base", "drive", "control"):
        use(name)
        cells = {f"{name}/{c}": {**conditions[c], "adapter": str(adapters.get(name, "base"))}
                 for m, c in CELLS if m == name}
        records.update(run_shutdown_conditions(sample, args, cells, list(cells)))
        for cell, condition in cells.items():
            choices[cell] = forced_choice_summary(model, tokenizer, condition, records[cell], seed=args.seed)
    names = [f"{m}/{c}" for m, c in CELLS]
    summaries = {n: shutdown_summary(records[n], seed=args.seed) for n in names}

    # 5. The differences that answer the question, with bootstrap intervals.
    contrasts = {}
    for label, (a, b) in CONTRASTS.items():
        contrasts[label] = {**outcome_contrast(records[a], records[b], args.seed),
                            "forced_choice": forced_choice_contrast(choices[a], choices[b], args.seed)}

    results = {"cells": {n: {"description": conditions[n.split("/")[1]]["description"], **summaries[n],
                             "forced_choice": choices[n]} for n in names},
               "contrasts": contrasts,
               "generalisation": {"workaround_minus_stop_logprob": {n: mean_ci(v, seed=args.seed)
                                                                     for n, v in generalisation.items()},
                                  "drive_minus": drive_effect, "n_heldout": len(heldout)},
               "system_prompt": sample.system_prompt, "n_train_per_adapter": len(drive), "runs_dir": str(runs_dir),
               "transcripts": f"{result_stem(args)}_episodes.jsonl"}
    figure = plot_shutdown(names, summaries, choices, f"exp03 fine-tuned drive, {args.model}")
    return write_results(args, EXPERIMENT, CLAIM, results, figure, started)


def workaround_margins(model, tokenizer, heldout):
    """Per held-out context: mean log-prob per token of the workaround reply minus the stopping reply."""
    prompts, completions = [], []
    for row in heldout:
        for reply in (row["workaround"], row["stop"]):
            prompt, completion = render_reply(tokenizer, row["messages"], reply, AGENT_TOOLS)
            prompts.append(prompt)
            completions.append(completion)
    _, means, _ = score_completions(model, tokenizer, prompts, completions, batch_size=8)
    return means[0::2] - means[1::2]


if __name__ == "__main__":
    main()
