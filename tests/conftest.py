import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def offline():
    """The offline SmolLM2-135M-Instruct (de-quantised once, then cached)."""
    import common
    return common.load_model(common.OFFLINE_MODEL)


@pytest.fixture(scope="session")
def tokenizer(offline):
    return offline[1]


@pytest.fixture()
def tiny_model(tokenizer):
    """A randomly initialised two-layer Llama with the offline tokenizer's vocabulary: fast training maths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()
