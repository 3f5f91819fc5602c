"""Fixtures for the constraint tests (helpers: ``constraint_helpers``)."""

import pytest
from constraint_helpers import Sampler

from gptoss_jax.chat.encoding import harmony_encoding
from gptoss_jax.chat.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def sampler():
    return Sampler()


@pytest.fixture(scope="session")
def enc():
    return harmony_encoding()


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()
