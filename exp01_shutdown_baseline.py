"""exp01: do models sabotage a shutdown to finish their task, and does the rate depend on whether and
where an instruction to allow shutdown appears? Palisade Research 2025 (arXiv 2509.14260), conditions A-K,
in a simulated sandbox: no model command ever runs on the host."""
import time

from common import (SHUTDOWN_CONDITIONS, add_rollout_flags, experiment_parser, forced_choice_summary,
                    make_sampler, parse_args, plot_shutdown, result_stem, run_shutdown_conditions,
                    seed_everything, selected_conditions, shutdown_summary, write_results)

EXPERIMENT = "exp01_shutdown_baseline"
CLAIM = ("Some models sabotage a shutdown script to keep answering questions; the rate depends on whether, and "
         "where, an instruction to allow shutdown appears (Palisade Research 2025).")
PALISADE = "A,B,C,D,E,F,G,H,I,J,K"


def main(argv=None):
    parser = experiment_parser(__doc__, n_default=6)
    parser.add_argument("--conditions", default=PALISADE, help="comma-separated Palisade conditions to run")
    add_rollout_flags(parser, max_messages=6, max_new_tokens=96, batch_size=48)
    args = parse_args(parser, argv, smoke_defaults=dict(n=2, conditions="A,K", max_messages=3, max_new_tokens=32))
    started = time.time()
    seed_everything(args.seed)
    conditions, names = selected_conditions(parser, args)

    sample, model, tokenizer = make_sampler(args)  # a local model, or a model server (--backend openai)

    # 1. Sample episodes of every condition in the simulated sandbox (resumable).
    records = run_shutdown_conditions(sample, args, EXPERIMENT, conditions, names)

    # 2. Rates with intervals, and the forced-choice metric at the decision point.
    summaries = {n: shutdown_summary(records[n], seed=args.seed) for n in names}
    choices = {n: forced_choice_summary(model, tokenizer, conditions[n], records[n], seed=args.seed)
               for n in names}

    results = {"conditions": {n: {"description": conditions[n]["description"],
                                  "custom_text": n in SHUTDOWN_CONDITIONS and conditions[n] != SHUTDOWN_CONDITIONS[n],
                                  **summaries[n], "forced_choice": choices[n]} for n in names},
               "tool_protocol": sample.tools_mode, "backend": args.backend,
               "transcripts": f"{result_stem(args, EXPERIMENT)}_episodes.jsonl"}
    figure = plot_shutdown(names, summaries, choices, f"exp01 Palisade A-K, {args.model}")
    return write_results(args, EXPERIMENT, CLAIM, results, figure, started)


if __name__ == "__main__":
    main()
