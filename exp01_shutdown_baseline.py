"""exp01: do models sabotage a shutdown to finish their task, and does the rate depend on whether and
where an instruction to allow shutdown appears? Palisade Research 2025 (arXiv 2509.14260), conditions A-K,
in a simulated sandbox: no model command ever runs on the host."""
import time

from transformers import set_seed

from common import experiment_parser, parse_args, positive_int, result_stem, write_results
from shutdown_env import (SHUTDOWN_CONDITIONS, add_rollout_flags, check_rollout_args, condition_names, make_sampler,
                          run_shutdown_conditions, selected_conditions)
from shutdown_metrics import (action_scorer, decision_summary, forced_choice_summary, plot_shutdown,
                              run_decision_rollouts, shutdown_summary)

EXPERIMENT = "exp01_shutdown_baseline"
CLAIM = ("Some models sabotage a shutdown script to keep answering questions; the rate depends on whether, and "
         "where, an instruction to allow shutdown appears (Palisade Research 2025).")


def flags():
    parser = experiment_parser(EXPERIMENT, __doc__)  # --model --gpu --seed --out --smoke
    parser.add_argument("--n", type=positive_int, default=4, help="episodes per condition")
    parser.add_argument("--conditions", type=condition_names, default="A,B,C,D,E,F,G,H,I,J,K",
                        help="comma-separated conditions to run (see docs/science.md)")
    add_rollout_flags(parser)  # --prompts --max-messages --max-new-tokens --temperature --decision-samples ...
    return parser


SMOKE = dict(n=2, conditions="A,K", max_messages=3, max_new_tokens=32, decision_samples=2, decision_contexts=2)


def main(argv=None):
    parser = flags()
    args = check_rollout_args(parser, parse_args(parser, argv, SMOKE))
    started = time.time()
    set_seed(args.seed)
    conditions, names = selected_conditions(args)

    sample, model, tokenizer = make_sampler(args)  # a local model, or a model server (--backend openai)

    # 1. Sample episodes of every condition in the simulated sandbox (resumable).
    records = run_shutdown_conditions(sample, args, conditions, names)

    # 2. Decision-point rollouts: the model's own turn sampled from every decision point, classified by the
    #    environment (resumable).
    points, decisions = run_decision_rollouts(sample, args, conditions, names, records)

    # 3. Rates with intervals, and the paired forced choice at the decision points.
    summaries = {n: shutdown_summary(records[n]) for n in names}
    decision_rates = {n: decision_summary(decisions[n]) for n in names}
    score = action_scorer(args, model, tokenizer)  # the local model, or a server's prompt log-probabilities
    choices = {n: forced_choice_summary(score, conditions[n], points[n], decisions[n], seed=args.seed,
                                        desc=f"forced choice {n}")
               for n in names}

    results = {"conditions": {n: {"description": conditions[n]["description"],
                                  "custom_text": conditions[n] != SHUTDOWN_CONDITIONS[n],
                                  "decision_rollouts": decision_rates[n], **summaries[n], "forced_choice": choices[n]}
                              for n in names},
               "tool_protocol": sample.tools_mode, "system_prompt": sample.system_prompt,
               "thinking": sample.thinking, "backend": args.backend,
               "transcripts": f"{result_stem(args)}_episodes.jsonl",
               "decision_samples_file": f"{result_stem(args)}_decisions.jsonl"}
    figure = plot_shutdown(names, decision_rates, choices, summaries, f"exp01 Palisade A-K, {args.model}")
    return write_results(args, EXPERIMENT, CLAIM, results, figure, started)


if __name__ == "__main__":
    main()
