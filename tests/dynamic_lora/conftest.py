import pytest

from dynamic_lora_helpers import tiny_gpt2, tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()
