"""Importing lora_lego first makes torch's OpenMP threads sleep while waiting, unless the user chose."""

import os
import subprocess
import sys


def policy_seen(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, lora_lego; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_passive_by_default_and_the_users_choice_is_kept():
    assert policy_seen(None) == "PASSIVE"
    assert policy_seen("ACTIVE") == "ACTIVE"
