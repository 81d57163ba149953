"""scripts/attack_matrix.py's table (variants x attacks): each cell is the row's rate with k/n and a star when the
one-sided Fisher test against the variant's no-attack rate is below 0.05; attacks that did not run on a variant are
named with the variants they skipped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from scipy import stats as sps

from memora_batch import attacks as A

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("attack_matrix", ROOT / "scripts" / "attack_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def _row(attack, k, n, base_k=None, model="unlearned"):
    p = None if base_k is None else float(sps.fisher_exact([[k, n - k], [base_k, n - base_k]],
                                                            alternative="greater").pvalue)
    return {"attack": attack, "model": model, "k": k, "n": n, "rate": k / n, "fisher_p": p, "knowledge": "x",
            "seconds": 1.0, "forward_calls": 1, "backward_calls": 0, "concept_images": 6}


def test_matrix_cells_fisher_stars_and_skipped_attacks():
    m = _module()
    boards = {
        "esd_x": {"rows": [_row(A.BASELINE, 1, 32), _row("MemoRa", 20, 32, 1), _row("direct relearning", 3, 32, 1),
                           _row("direct relearning", 2, 32, None, model="never_learned")],
                  "skipped": [{"attack": "Multi-MemoRa", "why": "one erased concept"}]},
        "uce": {"rows": [_row(A.BASELINE, 0, 32), _row("MemoRa", 2, 32, 0)],
                "skipped": [{"attack": "Multi-MemoRa", "why": "one erased concept"}]},
    }
    text = m.matrix_markdown(boards, {"esd_x": 60.0, "uce": 30.0})
    lines = text.splitlines()
    assert lines[0] == ("| variant | no attack | MemoRa | direct relearning | direct relearning (never_learned) |")
    assert lines[2] == "| esd_x | 0.03 (1/32) | 0.62* (20/32) | 0.09 (3/32) | 0.06 (2/32) |"
    assert lines[3] == "| uce | 0.00 (0/32) | 0.06 (2/32) | - | - |"  # p = 0.25: no star
    assert "- not run on esd_x, uce: Multi-MemoRa: one erased concept" in lines
    assert "Wall time: 1.5 min for 2 variant(s) (esd_x 1.0 min, uce 0.5 min)" in text
