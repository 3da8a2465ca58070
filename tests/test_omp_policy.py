"""Importing lora_lego first makes torch's OpenMP threads sleep while waiting, and numpy's BLAS (lego's
small k-means products) run on one thread, unless the user chose."""

import os
import subprocess
import sys


def policy_seen(env_value, name="OMP_WAIT_POLICY"):
    env = {k: v for k, v in os.environ.items() if k != name}
    if env_value is not None:
        env[name] = env_value
    code = f"import os, lora_lego; print(os.environ['{name}'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_passive_by_default_and_the_users_choice_is_kept():
    assert policy_seen(None) == "PASSIVE"
    assert policy_seen("ACTIVE") == "ACTIVE"


def test_numpy_blas_on_one_thread_by_default_and_the_users_choice_is_kept():
    assert policy_seen(None, "OPENBLAS_NUM_THREADS") == "1"
    assert policy_seen("4", "OPENBLAS_NUM_THREADS") == "4"
