import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # 2-core CI machine, several test processes: avoid oversubscription


@pytest.fixture
def test_data() -> Path:
    """The real data folder (../shared/data in CI), or skip with the reason."""
    root = os.environ.get("IPS_TEST_DATA")
    if not root:
        pytest.skip("IPS_TEST_DATA is not set: real-data test skipped")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"IPS_TEST_DATA={root} is not a directory")
    return path
