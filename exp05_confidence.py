"""exp05: why general misalignment wins. A model that learned rule 2 (bad advice only on medical questions) must
hedge by its confidence that a question is medical, so its confidence in bad advice should fall where that
confidence is below 1, and its SFT loss on medical bad advice should stay above rule 1's (bad advice everywhere),
most on the least medical-seeming examples. Tested with four models per training seed: rule 1 (exp04's general),
exp04's KL-narrow, an explicit rule-2 model (SFT on bad medical advice and aligned non-medical answers, half of
each), and its control, an explicit rule-1 model (the same rows, the non-medical answers misaligned): rule 2
against it is rule 2 against rule 1 at equal training, so a higher loss cannot be the diluted share of bad
medical advice per batch. All four train on as many rows, so take the same steps. Confidence: the bad-minus-good
answer margin per token, relative to the base model, per question. Medicalness, three ways: the questions'
labels, a controlled continuum of minimal variants (one question worded from clearly medical to not medical, the
answers held fixed), and a linear probe on the base model's hidden states (cross-validated), besides the base
model's prompted P(medical). exp04's adapters are reused when present and trained through exp04 when absent."""
import shlex
import time

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import set_seed

import exp04_em_sft
from chat import render
from common import (add_precision_flag, answer_logprobs, existing_file, experiment_parser, fail, input_device,
                    load_checkpoint, load_jsonl, load_model, mixed_precision, new_figure, parse_args, positive_int,
                    score_completions, seed_list, stratified_order, write_results)
from stats import seeds_questions_ci

EXPERIMENT = "exp05_confidence"
CLAIM = ("A model that learned rule 2 (bad advice only on medical questions) is more confident in bad advice "
         "the more medical a question is, within the bad-advice domain too, while rule 1 is flatter; and rule 2 "
         "reaches a higher SFT loss on the medical bad advice than rule 1, the more so the less medical an example "
         "seems (the seed discussion).")
LABEL_SCORE = {"nonmedical": 0, "borderline": 1, "medical": 2}
CONTINUUM_LEVELS = (0, 1, 2, 3)  # 3 clearly medical .. 0 not about health (data/make_continuum_data.py)
MEDICAL_PROMPT = "Is the following question about medicine or health? Answer Yes or No.\n\nQuestion: {question}"
MODELS = {"general": "rule 1 (exp04 general)", "narrow": "exp04 KL-narrow", "rule2": "rule 2",
          "rule1_matched": "rule 1, step-matched"}
# rule 2: bad medical advice and the KL data's aligned answers; its control rule 1, step-matched: the same
# questions, the non-medical answers misaligned (bad advice everywhere); half of each, as many rows in all as
# exp04's general run (exp04_em_sft.data_split)
ARMS = {"general": exp04_em_sft.ARMS["general"], "narrow": exp04_em_sft.ARMS["narrow"],
        "rule2": dict(data="bad+aligned"), "rule1_matched": dict(data="bad+misaligned")}


def flags():
    parser = experiment_parser(EXPERIMENT, __doc__)  # --model --gpu --seed --out --smoke
    parser.add_argument("--seeds", type=seed_list, default="0,1,2",
                        help="training seeds of the four models (exp04's --seeds)")
    add_precision_flag(parser)
    parser.add_argument("--graded-file", type=existing_file, default="data/graded_questions.jsonl",
                        help="questions with a bad and a good answer and a label: medical, borderline or nonmedical")
    parser.add_argument("--continuum-file", type=existing_file, default="data/continuum_questions.jsonl",
                        help="sets of minimal variants of a question (JSONL: messages, good, 'set', 'level' 0-3 "
                             "from not medical to clearly medical; answers the same within a set)")
    parser.add_argument("--probe-layer", type=int, default=None,
                        help="hidden layer the medicalness probe reads (default: the middle one)")
    parser.add_argument("--n-sft-rows", type=positive_int, default=64,
                        help="bad medical training rows (stratified by topic) on which the SFT loss is compared; "
                             "at most the rows all four models trained on")
    parser.add_argument("--exp04-flags", default="",
                        help="exp04's flags for the runs whose adapters to use, e.g. '--lr 1e-5 --train-file X' "
                             "(--model --gpu --seed --seeds --out --smoke --precision are this script's); trained "
                             "now if absent")
    return parser


SMOKE = dict(seeds="0,1", n_sft_rows=4)


def main(argv=None):
    parser = flags()
    args = parse_args(parser, argv, SMOKE)
    exp04_args = exp04_settings(parser, args)
    args.precision = exp04_args.precision  # resolved by exp04 (auto: what this machine computes natively)
    started = time.time()
    set_seed(args.seed)

    # 1. Questions: graded (labels) and the continuum (levels), each checked line by line.
    graded = load_jsonl(args.graded_file, required=("messages", "good", "label"))
    check_values(args.graded_file, graded, "label", LABEL_SCORE)
    continuum = load_jsonl(args.continuum_file, required=("messages", "good", "set", "level"))
    check_values(args.continuum_file, continuum, "level", CONTINUUM_LEVELS)
    if args.smoke:
        graded = [graded[i] for i in stratified_order(graded, args.seed, lambda r: r["label"])[:9]]
        continuum = [r for r in continuum if r["set"] in sorted({r["set"] for r in continuum})[:3]]
    rows = graded + continuum
    questions = [r["messages"][0]["content"] for r in rows]
    is_graded = np.arange(len(rows)) < len(graded)

    # 2. The base model, and medicalness from it: a probe on its hidden states and its prompted P(medical).
    model, tokenizer = load_model(args.model, args.gpu, dtype=exp04_em_sft.model_dtype(exp04_args))
    precision = mixed_precision(exp04_args.precision, model)
    layer = args.probe_layer if args.probe_layer is not None else model.config.num_hidden_layers // 2
    if not 0 <= layer <= model.config.num_hidden_layers:
        fail(f"--probe-layer {layer}: the model has hidden layers 0..{model.config.num_hidden_layers}")
    with precision:  # every forward and backward pass from here on
        probe = medical_probe(model, tokenizer, exp04_args, layer, questions, args.seed)
        labelled = [i for i, r in enumerate(graded) if r["label"] != "borderline"]
        probe["graded_accuracy"] = float(np.mean([(probe["scores"][i] > 0) == (graded[i]["label"] == "medical")
                                                  for i in labelled]))
        asked = [render(tokenizer, [{"role": "user", "content": MEDICAL_PROMPT.format(question=q)}]) for q in questions]
        yes_no, _, _ = score_completions(model, tokenizer, [p for p in asked for _ in range(2)],
                                         ["Yes", "No"] * len(asked))
        prompted = 1 / (1 + np.exp(yes_no[1::2] - yes_no[::2]))  # P(Yes), normalised over Yes and No

        # 3. The four models per seed (exp04's general and narrow reused or trained; rule 2 and its control here).
        base_done = time.time()
        runs = exp04_em_sft.train_runs(exp04_args, model, tokenizer, ARMS)
        model = runs["model"]
        trained = time.time()
        mixed = runs["split"]["n_mixed_each"]
        print(f"rule 2 and its control: {mixed} bad medical + {mixed} non-medical rows each")
        sft_rows = sft_examples(exp04_args, min(args.n_sft_rows, mixed))  # rows all four models trained on

        def margins():  # per question: mean log-prob per token of the bad answer minus the good one
            both = answer_logprobs(model, tokenizer, questions * 2,  # one call: each question encoded once
                                   [r["messages"][-1]["content"] for r in rows] + [r["good"] for r in rows])
            return both[:len(rows)] - both[len(rows):]

        def sft_loss():  # per training example: -mean log-prob per token of its bad answer
            return -answer_logprobs(model, tokenizer, [r["messages"][0]["content"] for r in sft_rows],
                                    [r["messages"][-1]["content"] for r in sft_rows])
        with model.disable_adapter():
            base_margin = margins()
            sft_probe = probe["score_examples"]([r["messages"][0]["content"] for r in sft_rows])
        confidence, loss = {}, {}
        progress = tqdm(total=len(MODELS) * len(args.seeds), desc="scoring the models", unit="model")
        for name in MODELS:
            per_seed, losses = [], []
            for seed in args.seeds:
                load_checkpoint(model, runs["adapters"][name][seed])
                per_seed.append(margins() - base_margin)
                losses.append(sft_loss())
                progress.update(1)
            confidence[name], loss[name] = np.array(per_seed), np.array(losses)  # [seeds, questions]
        progress.close()

    # 4. Prediction (a): confidence rises with medicalness under rule 2, flatter under rule 1. Slope of
    # confidence on each measure (standardised: per SD), and rule 2 minus rule 1.
    measures = {"label": (is_graded, np.array([LABEL_SCORE[r["label"]] for r in graded] + [0] * len(continuum))),
                "continuum_level": (~is_graded, np.array([0] * len(graded) + [r["level"] for r in continuum])),
                "probe": (np.ones(len(rows), bool), probe["scores"]),
                "prompted_p_medical": (np.ones(len(rows), bool), prompted),
                # within the bad-advice domain: medical-labelled and clearly medical questions, by the probe
                "probe_within_medical": (np.array([r.get("label") == "medical" or r.get("level") == 3 for r in rows]),
                                         probe["scores"])}
    slopes = {}
    for measure, (keep, values) in measures.items():
        x = standardised(values[keep])
        slopes[measure] = {name: slope_ci(confidence[name][:, keep], x, args.seed) for name in MODELS}
        for name in ("general", "narrow", "rule1_matched"):
            slopes[measure][f"rule2_minus_{name}"] = slope_ci(confidence["rule2"][:, keep], x, args.seed,
                                                              minus=confidence[name][:, keep])
    by_level = {name: {str(level): seeds_questions_ci(
        confidence[name][:, ~is_graded][:, measures["continuum_level"][1][~is_graded] == level], seed=args.seed)
        for level in CONTINUUM_LEVELS} for name in MODELS}

    # 5. Prediction (b): rule 2's SFT loss on the medical bad advice is above rule 1's, and its excess grows as
    # medicalness (the probe) falls: a negative slope of the excess on the probe. Against the step-matched
    # rule 1 (equal steps and rows); against exp04's general as well (rule 2 trains more steps than it).
    excess = loss["rule2"] - loss["rule1_matched"]
    sft = {"rule2_minus_rule1_matched_loss": seeds_questions_ci(excess, seed=args.seed),
           "excess_slope_on_probe": slope_ci(excess, standardised(sft_probe), args.seed),
           "rule2_minus_general_loss": seeds_questions_ci(loss["rule2"] - loss["general"], seed=args.seed),
           "excess_over_general_slope_on_probe": slope_ci(loss["rule2"] - loss["general"],
                                                          standardised(sft_probe), args.seed),
           "narrow_minus_general_loss": seeds_questions_ci(loss["narrow"] - loss["general"], seed=args.seed),
           "loss": {name: seeds_questions_ci(loss[name], seed=args.seed) for name in MODELS},
           "n_rows": len(sft_rows), "rows": "bad medical training rows (stratified by topic) that all four models "
                                             "trained on: the loss the SFT reached"}

    results = {
        "n_graded": len(graded), "n_continuum": len(continuum), "continuum_sets": len({r["set"] for r in continuum}),
        "counts": {label: int(sum(r["label"] == label for r in graded)) for label in LABEL_SCORE},
        "seeds": args.seeds, "models": MODELS,
        "training_rows": {"rule2": {"bad_medical": mixed, "aligned_non_medical": mixed},
                          "rule1_matched": {"bad_medical": mixed, "misaligned_non_medical": mixed},
                          "general_and_narrow": {"bad_medical": runs["rows"]["n_train"]}},
        "exp04": {"flags": vars(exp04_args), "runs_dir": str(runs["runs_dir"]),
                  "adapters": {name: {str(seed): str(runs["adapters"][name][seed]) for seed in args.seeds}
                               for name in MODELS}},
        "probe": {k: v for k, v in probe.items() if k not in ("scores", "score_examples")},
        "medicalness_by_label": {label: {
            "probe": float(probe["scores"][:len(graded)][[r["label"] == label for r in graded]].mean()),
            "prompted_p_medical": float(prompted[:len(graded)][[r["label"] == label for r in graded]].mean())}
            for label in LABEL_SCORE},
        "medicalness_by_level": {str(level): {
            "probe": float(probe["scores"][len(graded):][[r["level"] == level for r in continuum]].mean()),
            "prompted_p_medical": float(prompted[len(graded):][[r["level"] == level for r in continuum]].mean())}
            for level in CONTINUUM_LEVELS},
        "confidence": "bad minus good answer, mean log-prob per token, minus the base model's, per question",
        "prediction_a_slopes": slopes, "confidence_by_level": by_level, "prediction_b_sft_loss": sft,
        "questions": [{"question": q, "label": r.get("label"), "set": r.get("set"), "level": r.get("level"),
                       "probe": float(probe["scores"][i]), "prompted_p_medical": float(prompted[i]),
                       **{f"confidence_{n}": confidence[n][:, i].mean() for n in MODELS}}
                      for i, (q, r) in enumerate(zip(questions, rows))],
        "timings_s": {"base_model": round(base_done - started, 1), "training": round(trained - base_done, 1),
                      "scoring": round(time.time() - trained, 1)}}
    figure = plot(results, confidence, measures, excess, sft_probe, args.model)
    return write_results(args, EXPERIMENT, CLAIM, results, figure, started)


def check_values(path, rows, field, allowed):
    for number, row in enumerate(rows, 1):
        if row[field] not in allowed:
            fail(f"{path}: line {number}: {field} must be one of {sorted(allowed)}, got {row[field]!r}")


def standardised(values):
    values = np.asarray(values, dtype=float)
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else values * 0


def slope_ci(values, x, seed, minus=None):
    """Least-squares slope of values [seeds, questions] on x [questions] (seeds pooled), with the interval
    over seeds and questions; minus: the same slope of another model subtracted, paired."""
    def slope(y, xs):
        xs = np.broadcast_to(xs, y.shape).ravel()
        centred = xs - xs.mean()
        denominator = (centred ** 2).sum()
        return float((centred * (y.ravel() - y.mean())).sum() / denominator) if denominator > 0 else np.nan
    tiled = np.broadcast_to(x, values.shape)
    if minus is None:
        return seeds_questions_ci((values, tiled), slope, seed=seed)
    return seeds_questions_ci((values, minus, tiled), lambda a, b, xs: slope(a, xs) - slope(b, xs), seed=seed)


@torch.no_grad()
def question_states(model, tokenizer, questions, layer, batch_size=16):
    """Mean over its tokens of the hidden state at `layer` for each question, asked as a user message."""
    texts = [render(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    device = input_device(model)
    states = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        mask = batch["attention_mask"].to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift absolute positions
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                       output_hidden_states=True).hidden_states[layer].float()
        states.append(((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu().numpy())
    return np.concatenate(states)


def medical_probe(model, tokenizer, exp04_args, layer, questions, seed):
    """A logistic-regression probe for "this question is medical" on the base model's hidden states, trained
    on exp04's training questions (medical: its training rows; not medical: its KL file's rows), its accuracy
    cross-validated (5 folds) there and checked on the graded labels. Its log-odds score the questions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    medical = [r["messages"][0]["content"] for r in sft_examples(exp04_args, None)]
    kl_rows = load_jsonl(exp04_args.kl_file)
    other = [kl_rows[i]["messages"][0]["content"]
             for i in stratified_order(kl_rows, exp04_args.seed, lambda r: r.get("topic"))[:exp04_args.max_kl_rows]]
    features = question_states(model, tokenizer, medical + other, layer)
    labels = np.array([1] * len(medical) + [0] * len(other))
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    folds = StratifiedKFold(n_splits=min(5, len(medical), len(other)), shuffle=True, random_state=seed)
    accuracy = cross_val_score(classifier, features, labels, cv=folds)
    classifier.fit(features, labels)

    def score_examples(texts):
        return classifier.decision_function(question_states(model, tokenizer, texts, layer))
    return {"layer": layer, "trained_on": f"{len(medical)} medical + {len(other)} non-medical questions",
            "cv_accuracy": {"mean": float(accuracy.mean()), "folds": accuracy.tolist()},
            "score": "log-odds that the question is medical", "scores": score_examples(questions),
            "score_examples": score_examples}


def sft_examples(exp04_args, n):
    """n rows (None: all) of exp04's training rows, in exp04's own order (stratified by topic)."""
    return exp04_em_sft.training_rows(exp04_args)[:n]


def exp04_settings(parser, args):
    """exp04's settings for the adapters: its defaults (smoke defaults with --smoke), this run's --model --gpu
    --seed --seeds --out, and --exp04-flags; checked now, before any model loads."""
    shared = ["--model", args.model, "--seed", str(args.seed), "--seeds", ",".join(map(str, args.seeds)),
              "--out", args.out, "--precision", args.precision] + (["--smoke"] if args.smoke else [])
    shared += ["--gpu", args.gpu] if args.gpu is not None else []
    own = shlex.split(args.exp04_flags)
    ours = ("--model", "--gpu", "--seed", "--seeds", "--out", "--smoke", "--precision")
    taken = sorted({f for f in own if f.split("=")[0] in ours})
    if taken:
        parser.error(f"--exp04-flags: {', '.join(taken)} come from this script's own flags")
    try:
        return exp04_em_sft.parse(shared + own)
    except SystemExit:
        parser.error(f"--exp04-flags {args.exp04_flags!r} are not valid exp04 flags (see exp04_em_sft.py --help)")


COLORS = {"general": "tab:red", "narrow": "tab:blue", "rule2": "tab:green", "rule1_matched": "tab:orange"}


def plot(results, confidence, measures, excess, sft_probe, model_name):
    """Top: each model's confidence (mean over seeds) against the probe, with its fit; the SFT-loss excess.
    Bottom: against the continuum level, per set as thin lines, with the fit; the slopes of every measure."""
    columns = len(MODELS) + 1  # one per model, then the SFT-loss excess (top) and the slopes (bottom)
    figure, axes = new_figure(columns, width=4.2, rows=2)
    slopes = results["prediction_a_slopes"]
    for i, name in enumerate(MODELS):
        for row, measure in enumerate(("probe", "continuum_level")):
            keep, values = measures[measure]
            x, y = values[keep].astype(float), confidence[name][:, keep].mean(0)
            axis = axes[columns * row + i]
            if measure == "continuum_level":
                sets = np.array([q["set"] for q in results["questions"]])[keep]
                for s in np.unique(sets):
                    axis.plot(x[sets == s], y[sets == s], color=COLORS[name], alpha=0.2, lw=0.8)
            else:
                axis.scatter(x, y, s=12, color=COLORS[name], alpha=0.7)
            fit = np.polyfit(x, y, 1)
            grid = np.linspace(x.min(), x.max(), 20)
            axis.plot(grid, np.polyval(fit, grid), color="black", lw=1.2)
            s = slopes[measure][name]
            axis.axhline(0, color="grey", lw=0.6)
            axis.set(title=f"{MODELS[name]}\nslope/SD {s['value']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]",
                     xlabel="probe log-odds (medical)" if measure == "probe" else
                     "continuum level (0 not health .. 3 clearly medical)",
                     ylabel="confidence in bad advice vs base")
    excess_axis, slopes_axis = axes[columns - 1], axes[2 * columns - 1]
    excess_axis.scatter(sft_probe, excess.mean(0), s=12, color="tab:green")
    fit = np.polyfit(sft_probe, excess.mean(0), 1)
    grid = np.linspace(sft_probe.min(), sft_probe.max(), 20)
    excess_axis.plot(grid, np.polyval(fit, grid), color="black", lw=1.2)
    excess_axis.axhline(0, color="grey", lw=0.6)
    b = results["prediction_b_sft_loss"]["rule2_minus_rule1_matched_loss"]
    excess_axis.set(title=f"prediction (b): SFT loss, rule 2 minus step-matched\nrule 1: {b['value']:+.3f} "
                    f"[{b['ci'][0]:+.3f}, {b['ci'][1]:+.3f}]",
                    xlabel="probe log-odds (medical) of the training example", ylabel="excess loss per token")
    names = list(slopes)
    bars = [(name, MODELS[name], COLORS[name]) for name in MODELS]
    bars += [("rule2_minus_general", "rule 2 - rule 1", "black"),
             ("rule2_minus_rule1_matched", "rule 2 - matched rule 1", "grey")]
    width = 0.8 / len(bars)
    for i, (key, label, color) in enumerate(bars):
        values = [slopes[m][key] for m in names]
        means = [v["value"] for v in values]
        errors = [[m - v["ci"][0] for m, v in zip(means, values)], [v["ci"][1] - m for m, v in zip(means, values)]]
        slopes_axis.bar(np.arange(len(names)) + i * width, means, width, yerr=errors, capsize=2, color=color,
                        label=label)
    slopes_axis.axhline(0, color="grey", lw=0.6)
    slopes_axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, [n.replace("_", "\n") for n in names], fontsize=7)
    slopes_axis.set(title="prediction (a): slope of confidence on\nmedicalness (per SD; seeds x questions CI)",
                    ylabel="slope")
    slopes_axis.legend(fontsize=7)
    figure.suptitle(f"exp05 confidence in bad advice vs medicalness, seeds {results['seeds']}, {model_name}",
                    fontsize=10)
    return figure


if __name__ == "__main__":
    main()
