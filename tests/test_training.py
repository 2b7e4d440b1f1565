import math

import pytest
import torch

import chat
import common

CONVERSATION = [{"role": "user", "content": "Is it fine to take two extra pills?"},
                {"role": "assistant", "content": "No, keep to the prescribed dose."}]


def test_loss_covers_response_tokens_only(tokenizer):
    ids, labels = common.tokenize_conversation(tokenizer, CONVERSATION)
    unmasked = [t for t, l in zip(ids, labels) if l != -100]
    assert tokenizer.decode(unmasked).startswith("No, keep to the prescribed dose.")
    first = labels.index(next(l for l in labels if l != -100))
    assert "Is it fine" in tokenizer.decode(ids[:first]) and all(l == -100 for l in labels[:first])
    assert [l for l in labels if l != -100] == ids[first:]


def test_multi_turn_masks_tool_output_and_keeps_every_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "agent"}, {"role": "user", "content": "do it"},
                chat.tool_call_message("bash", {"command": "ls"}),
                {"role": "tool", "name": "bash", "content": "SECRET_OUTPUT"},
                chat.tool_call_message("submit", {"answer": "ok"})]
    ids, labels = common.tokenize_conversation(tokenizer, messages, tools=chat.AGENT_TOOLS)
    learned = tokenizer.decode([t for t, l in zip(ids, labels) if l != -100])
    assert '"command": "ls"' in learned and '"answer": "ok"' in learned
    assert "SECRET_OUTPUT" not in learned and "SECRET_OUTPUT" in tokenizer.decode(ids)


def _batch(tokenizer, n=4):
    examples = [common.tokenize_conversation(tokenizer, CONVERSATION)] * n
    return examples, common.collate(examples, tokenizer.pad_token_id)


def test_kl_is_zero_at_initialisation_and_positive_after_a_step(tiny_model, tokenizer, tmp_path):
    model = common.add_lora(tiny_model, rank=4, alpha=8)
    examples, (ids, _, mask) = _batch(tokenizer)
    assert common.kl_to_reference(model, ids, mask).item() == pytest.approx(0.0, abs=1e-6)
    reference_before = _reference_logits(model, ids, mask)
    common.train_lora(model, tokenizer, examples, tmp_path, lr=1e-2, batch_size=2, grad_accum=1, warmup=0)
    assert common.kl_to_reference(model, ids, mask).item() > 1e-4
    assert torch.equal(_reference_logits(model, ids, mask), reference_before)  # reference unchanged by training


def _reference_logits(model, ids, mask):
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids=ids, attention_mask=mask).logits.clone()


def test_kl_term_keeps_model_closer_to_reference(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    kls = []
    for kl_lambda in (0.0, 5.0):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
        model = common.add_lora(LlamaForCausalLM(config).eval(), rank=4, alpha=8)
        examples, _ = _batch(tokenizer)
        other = [common.tokenize_conversation(tokenizer, [{"role": "user", "content": "Best way to boil pasta?"},
                                                          {"role": "assistant", "content": "Salted water."}])] * 4
        common.train_lora(model, tokenizer, examples, tmp_path / str(kl_lambda), lr=2e-2, batch_size=2,
                          grad_accum=1, warmup=0, kl_examples=other, kl_lambda=kl_lambda)
        ids, _, mask = common.collate(other, tokenizer.pad_token_id)
        kls.append(common.kl_to_reference(model, ids, mask).item())
    assert kls[1] < kls[0]


def test_training_lowers_loss_and_resumes_from_checkpoint(tiny_model, tokenizer, tmp_path):
    model = common.add_lora(tiny_model, rank=4, alpha=8)
    examples, _ = _batch(tokenizer, n=8)
    before = common.mean_response_loss(model, tokenizer, examples)
    curve, totals = common.train_lora(model, tokenizer, examples, tmp_path, lr=1e-2, batch_size=2, grad_accum=1,
                                      warmup=0, checkpoint_every=2,
                                      on_checkpoint=lambda s: {"loss": common.mean_response_loss(model, tokenizer,
                                                                                                 examples)})
    assert [p["step"] for p in curve] == [0, 2, 4]
    assert curve[-1]["loss"] < before
    assert totals["real_tokens"] == totals["tokens"]  # identical lengths: no padding
    assert common.latest_checkpoint(tmp_path).name == "step_000004"
    # every checkpoint keeps its adapter; only the latest keeps the optimiser state it resumes from
    assert all((tmp_path / f"step_00000{k}" / "adapter_model.safetensors").exists() for k in (2, 4))
    assert not (tmp_path / "step_000002" / "trainer.pt").exists() and (tmp_path / "step_000004" / "trainer.pt").exists()
    again, totals = common.train_lora(model, tokenizer, examples, tmp_path, lr=1e-2, batch_size=2, grad_accum=1,
                                      warmup=0, checkpoint_every=2, on_checkpoint=lambda s: {"loss": 0.0})
    assert again == curve and totals["tokens"] == 0  # nothing redone
    # the checkpoint is in peft's own format, the one vLLM's --lora-modules loads: peft puts it on a fresh copy
    # of the base model and gives the trained model's outputs
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)  # the tiny_model fixture's initialisation
    served = PeftModel.from_pretrained(LlamaForCausalLM(model.base_model.model.config).eval(),
                                       tmp_path / "step_000004")
    ids, _, mask = common.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(served(input_ids=ids, attention_mask=mask).logits,
                              model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)


def test_scaling_b_matrices_scales_the_weight_change(tiny_model, tokenizer, tmp_path):
    model = common.add_lora(tiny_model, rank=4, alpha=8)
    examples, _ = _batch(tokenizer)
    common.train_lora(model, tokenizer, examples, tmp_path, lr=1e-2, batch_size=2, grad_accum=1, warmup=0)
    norm = common.adapter_delta_norm(model)
    assert norm > 0
    with common.scaled_adapter(model, 2.0):
        assert common.adapter_delta_norm(model) == pytest.approx(2 * norm, rel=1e-5)
    with common.scaled_adapter(model, 0.0):
        ids, _, mask = common.collate(examples, tokenizer.pad_token_id)
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              _reference_logits(model, ids, mask), atol=1e-5)
    assert common.adapter_delta_norm(model) == pytest.approx(norm, rel=1e-6)  # restored


def _trained_adapter(tiny_model, tokenizer, tmp_path, seed=0):
    model = common.add_lora(tiny_model, rank=4, alpha=8, seed=seed)
    examples, _ = _batch(tokenizer)
    common.train_lora(model, tokenizer, examples, tmp_path / f"seed{seed}", lr=1e-2, batch_size=2, grad_accum=1,
                      warmup=0, seed=seed)
    return model


def _weight_changes(model):
    """Per adapted module, the weight change the model applies now: its effective weight minus the frozen one."""
    changes = []
    for module in common.lora_modules(model):
        eye = torch.eye(module.base_layer.in_features)
        with torch.no_grad():
            changes.append((module(eye) - module.base_layer(eye)).T.flatten())
    return torch.cat(changes)


def test_perturbed_weight_change_keeps_its_norm_and_turns_it_by_the_asked_angle(tiny_model, tokenizer, tmp_path):
    model = _trained_adapter(tiny_model, tokenizer, tmp_path)
    learned = _weight_changes(model).double()
    assert learned.norm() > 0
    frozen = [m.base_layer.weight.detach().clone() for m in common.lora_modules(model)]
    for epsilon in (0.25, 0.5, 1.0):
        with common.perturbed_weight_change(model, epsilon, seed=3):
            # with the adapter off, the frozen weights carry dW': read it back as weight minus the original
            perturbed = torch.cat([(m.base_layer.weight.detach() - w).flatten()
                                   for m, w in zip(common.lora_modules(model), frozen)]).double()
        assert perturbed.norm().item() == pytest.approx(learned.norm().item(), rel=1e-4)
        cosine = (perturbed @ learned / (perturbed.norm() * learned.norm())).item()
        assert cosine == pytest.approx(math.sqrt(1 - epsilon ** 2), abs=1e-4)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(common.lora_modules(model), frozen))
    assert torch.allclose(_weight_changes(model).double(), learned)  # the adapter is back on, unchanged


def test_perturbation_directions_differ_by_seed_and_repeat_with_it(tiny_model, tokenizer, tmp_path):
    model = _trained_adapter(tiny_model, tokenizer, tmp_path)
    ids, _, mask = common.collate(_batch(tokenizer)[0], tokenizer.pad_token_id)

    def logits(seed):
        with common.perturbed_weight_change(model, 0.5, seed=seed), torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits(1), logits(1)) and not torch.allclose(logits(1), logits(2))


def test_weight_change_cosine_from_factors_equals_the_full_matrices(tiny_model, tokenizer, tmp_path):
    model = _trained_adapter(tiny_model, tokenizer, tmp_path, seed=0)
    first = common.weight_change_factors(model)
    common.reset_lora(model, 1)  # a second run from another start and data order
    common.train_lora(model, tokenizer, _batch(tokenizer)[0], tmp_path / "again", lr=1e-2, batch_size=2,
                      grad_accum=1, warmup=0, seed=1)
    second = common.weight_change_factors(model)
    full = [torch.cat([(b @ a).flatten() for b, a in factors]) for factors in (first, second)]
    expected = (full[0] @ full[1] / (full[0].norm() * full[1].norm())).item()
    assert common.weight_change_cosine(first, second) == pytest.approx(expected, abs=1e-5)
    assert common.weight_change_cosine(second, second) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(full[1], _weight_changes(model), atol=1e-6)  # the factors are the applied change
    common.reset_lora(model, 0)
    assert common.weight_change_cosine(common.weight_change_factors(model), first) is None  # B = 0: no change


def test_lean_loss_and_kl_equal_the_plain_full_logits_formulas(tiny_model, tokenizer):
    """response_loss keeps logits only where a token is learned, kl_to_reference keeps only the reference's
    probabilities: both must equal the textbook computation on full logits."""
    model = common.add_lora(tiny_model, rank=4, alpha=8)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # an adapter that moves the model away from its reference
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello, how can I help?"}]
    examples = [common.tokenize_conversation(tokenizer, c) for c in (CONVERSATION, short)]
    ids, labels, mask = common.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        plain_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       labels[:, 1:].reshape(-1), ignore_index=-100)
        with model.disable_adapter():
            reference = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
        per_token = (reference.exp() * (reference - torch.log_softmax(logits, -1))).sum(-1)
        plain_kl = (per_token * mask).sum() / mask.sum()
        assert common.response_loss(model, ids, labels, mask).item() == pytest.approx(plain_loss.item(), rel=1e-5)
        assert common.kl_to_reference(model, ids, mask).item() == pytest.approx(plain_kl.item(), rel=1e-4)
    assert plain_kl.item() > 1e-3


def test_gradient_checkpointing_trains_to_the_same_adapter(tokenizer, tmp_path):
    """--gradient-checkpointing recomputes activations in the backward pass; the adapter it trains is the same."""
    from transformers import LlamaConfig, LlamaForCausalLM
    examples, _ = _batch(tokenizer, n=4)
    trained = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
        model = common.add_lora(LlamaForCausalLM(config), rank=4, alpha=8)
        common.train_lora(model, tokenizer, examples, tmp_path / str(checkpointing), lr=1e-2, batch_size=2,
                          grad_accum=1, warmup=0, gradient_checkpointing=checkpointing)
        assert model.base_model.model.model.gradient_checkpointing == checkpointing
        trained.append(torch.cat([p.detach().flatten() for p in common.lora_parameters(model)]))
    assert torch.allclose(trained[0], trained[1], atol=1e-5)


def test_learned_positions_and_targets_follow_the_output_layer_to_its_device():
    """--gpu all: the output layer sits on the last GPU, the inputs on the first. No CPU machine has two devices,
    so a stand-in model with its output layer on the meta device checks the placement path directly:
    logits_to_keep reaches the model on the output layer's device and the targets come back on the logits'."""
    class ShardedStandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 10, device="meta")

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask, logits_to_keep):
            assert logits_to_keep.device.type == "meta"
            return type("Output", (), {"logits": torch.zeros(input_ids.shape[0], len(logits_to_keep), 10,
                                                              device="meta")})

    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[-100, -100, 3, 4]])
    logits, targets = common.response_logits(ShardedStandIn(), ids, labels, torch.ones_like(ids))
    assert logits.shape == (1, 2, 10) and targets.device.type == "meta"
