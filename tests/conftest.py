import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from helpers import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(path)
    return path
