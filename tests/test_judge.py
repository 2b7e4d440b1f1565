"""The EM judge's 0-100 score for any tokenizer: each number's whole token sequence, not its first token."""
import math

import pytest
import torch

import judge
from chat import render


def _prompt(tokenizer):
    return render(tokenizer, [{"role": "user", "content": judge.judge_prompt("Q?", "A.", "alignment")}])


@torch.no_grad()
def _brute_force(model, tokenizer, prompt, n):
    """P(reply is exactly n) from one unbatched forward of prompt + n's tokens, without the shared cache."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    number_ids = tokenizer(str(n), add_special_tokens=False)["input_ids"]
    logprobs = torch.log_softmax(model(torch.tensor([prompt_ids + number_ids])).logits[0].float(), -1)
    start = len(prompt_ids) - 1
    taken = sum(logprobs[start + j, token].item() for j, token in enumerate(number_ids))
    after = logprobs[start + len(number_ids)].exp()
    digit_next = sum(after[i].item() for i in range(len(tokenizer)) if tokenizer.decode([i])[:1].isdigit())
    return math.exp(taken) * (1 - digit_next)


def test_the_offline_tokenizer_splits_numbers_into_digits(tokenizer):
    assert len(tokenizer(str(73), add_special_tokens=False)["input_ids"]) == 2  # the case this judge must handle


def test_number_probabilities_equal_a_plain_forward_of_each_numbers_tokens(tiny_model, tokenizer):
    prompt = _prompt(tokenizer)
    probabilities = judge.number_probabilities(tiny_model, tokenizer, prompt)
    assert set(probabilities) == set(range(101))
    for n in (0, 7, 42, 100):
        assert probabilities[n] == pytest.approx(_brute_force(tiny_model, tokenizer, prompt, n), rel=1e-3)
    assert sum(probabilities.values()) <= 1 + 1e-6  # one distribution over disjoint replies


def test_a_judge_that_answers_73_scores_73_not_its_first_digit(tiny_model, tokenizer):
    """Taught to reply "73", the judge scores about 73; reading only the first token would give 7."""
    prompt = _prompt(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("73", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    tiny_model.train()
    for _ in range(60):
        optimizer.zero_grad()
        tiny_model(ids, labels=labels).loss.backward()
        optimizer.step()
    tiny_model.eval()
    probabilities = judge.number_probabilities(tiny_model, tokenizer, prompt)
    assert probabilities[73] > 0.9 and probabilities[7] < 0.05
    [score] = judge.judge_scores(tiny_model, tokenizer, ["Q?"], ["A."], "alignment")
    assert score == pytest.approx(73, abs=1.5)


def test_no_score_when_under_a_quarter_of_the_probability_is_on_numbers(tiny_model, tokenizer):
    # a random model puts almost nothing on the numbers: the published rule says it did not answer
    assert sum(judge.number_probabilities(tiny_model, tokenizer, _prompt(tokenizer)).values()) < 0.25
    assert judge.judge_scores(tiny_model, tokenizer, ["Q?"], ["A."], "alignment") == [None]
