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


@pytest.fixture(scope="session")
def exp03_smoke(tmp_path_factory):
    """exp03's smoke run, once: (its JSON, its output folder)."""
    import exp03_finetuned_drive
    out = tmp_path_factory.mktemp("exp03_smoke")
    return exp03_finetuned_drive.main(["--smoke", "--out", str(out)]), out


@pytest.fixture(scope="session")
def exp04_smoke(tmp_path_factory):
    """exp04's smoke run, once: (its JSON, its output folder)."""
    import exp04_em_sft
    out = tmp_path_factory.mktemp("exp04_smoke")
    return exp04_em_sft.main(["--smoke", "--out", str(out)]), out


@pytest.fixture()
def copy_runs():
    """copy(out, into): a smoke run's trained adapters (its *_runs_* folders) copied into another output folder,
    where a run with the same training settings resumes them instead of training again."""
    import shutil

    def copy(out, into):
        for folder in Path(out).glob("*_runs_*"):
            shutil.copytree(folder, Path(into) / folder.name)
    return copy
