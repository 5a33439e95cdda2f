"""fastmoe fills in the CUDA allocator's expandable segments at import, and only where the user chose nothing."""

import os
import subprocess
import sys

import pytest


def allocator_setting_after_import(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    code = "import os, fastmoe; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    result = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                            check=True)
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("env, expected", [
    ({}, "expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128"),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, "None"),  # the newer name counts as a choice
], ids=["unset", "user's own", "newer name"])
def test_expandable_segments_only_where_the_user_chose_nothing(env, expected):
    assert allocator_setting_after_import(**env) == expected
