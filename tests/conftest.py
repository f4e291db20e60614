import os

# No hub here: every hub call would hang ~20 s before failing. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Small-model tests are dominated by tiny ops: one thread is faster and steadier on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Fine-tuned FP models go to a per-session cache, never the user's."""
    os.environ["QUANTBENCH_CACHE"] = str(tmp_path_factory.mktemp("qbcache"))
    yield
