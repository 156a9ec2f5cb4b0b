"""Dialogue metrics against hand-computed values (arithmetic in the comments), EVA differences, CLI."""

import json
import math
import random

import pytest

from huayu.cli import main
from huayu.evaluation.metrics import (
    bleu4,
    char_tokens,
    dialogue_metrics,
    distinct,
    rouge_l,
    unigram_f1,
)

# The worked example of docs/metrics.md.
HYPS = ["你爱我", "哈哈哈"]
REFS = ["我爱你", "哈哈"]
CLEAN = {"bleu4": 28.4055, "dist1": 66.6667, "dist2": 75.0, "dist3": 100.0, "dist4": 0.0,
         "f1": 90.0, "rouge_l": 56.6667}
EVA = {**CLEAN, "dist1": 75.0, "dist2": 100.0, "dist3": 0.0, "rouge_l": 58.1633}


def test_char_tokens_drops_whitespace():
    assert char_tokens("我 爱\t你\n　呀") == ["我", "爱", "你", "呀"]  # incl. U+3000


# --- BLEU-4 (NLTK corpus_bleu, method3) -------------------------------------------------------

def test_bleu4_single_pair():
    # 我爱你 vs 我爱她: p1 = 2/3, p2 = 1/2 (我爱), p3 = 0/1, p4 = 0/max(1, 0) = 0/1.
    # method3: p3 -> 1/(2^1 * 1) = 1/2, p4 -> 1/(2^2 * 1) = 1/4. c = r = 3: BP = exp(0) = 1.
    # BLEU = (2/3 * 1/2 * 1/2 * 1/4) ** (1/4) = (1/24) ** (1/4) = 0.4518
    assert bleu4(["我爱你"], ["我爱她"]) == pytest.approx(100 * (1 / 24) ** 0.25)


def test_bleu4_is_corpus_level():
    # Per-order counts are summed before dividing: p = 5/6, 1/4, 0/2 -> 1/(2*2), 0/2 -> 1/(4*2).
    # c = 6 > r = 5: BP = 1. BLEU = (5/6 * 1/4 * 1/4 * 1/8) ** (1/4) = (5/768) ** (1/4).
    assert bleu4(HYPS, REFS) == pytest.approx(100 * (5 / 768) ** 0.25)


def test_bleu4_brevity_penalty_and_whitespace():
    # Clean: 我爱 vs 我爱你们: p1 = 2/2, p2 = 1/1, p3 = 0/1 -> 1/2, p4 = 0/1 -> 1/4.
    # c = 2 <= r = 4: BP = exp(1 - 4/2) = e^-1. BLEU = e^-1 * (1/8) ** (1/4).
    assert bleu4(["我 爱"], ["我爱你们"]) == pytest.approx(100 * math.exp(-1) * (1 / 8) ** 0.25)
    # EVA keeps the space: hyp = 我,' ',爱 (c = 3). p1 = 2/3, p2 = 0/2 -> 1/(2*2),
    # p3 = 0/1 -> 1/(4*1), p4 = 0/1 -> 1/(8*1). BP = exp(1 - 4/3).
    # BLEU = e^(-1/3) * (2/3 * 1/4 * 1/4 * 1/8) ** (1/4) = e^(-1/3) * (1/192) ** (1/4).
    expected = 100 * math.exp(-1 / 3) * (1 / 192) ** 0.25
    assert bleu4(["我 爱"], ["我爱你们"], eva_compat=True) == pytest.approx(expected)


def test_bleu4_no_match_is_zero():
    assert bleu4(["你好"], ["再见"]) == 0.0
    assert bleu4([""], ["再见"]) == 0.0


# --- Dist-n -----------------------------------------------------------------------------------

def test_distinct_pools_all_responses():
    # 你好呀 + 你好: bigrams 你好, 好呀, 你好 -> unique 2 / all 3.
    assert distinct(["你好呀", "你好"], 2) == pytest.approx(200 / 3)
    # unigrams 你 好 呀 你 好 -> unique 3 / all 5.
    assert distinct(["你好呀", "你好"], 1) == pytest.approx(60.0)


def test_distinct_eva_skips_last_ngram():
    # EVA's range(len - n): 你好呀 -> 你好 only; 你好 -> none. unique 1 / all 1.
    assert distinct(["你好呀", "你好"], 2, eva_compat=True) == pytest.approx(100.0)
    # n = 1: 你 好 + 你 -> unique 2 / all 3.
    assert distinct(["你好呀", "你好"], 1, eva_compat=True) == pytest.approx(200 / 3)


def test_distinct_whitespace():
    # Clean: 你 好 好 -> 你 好 好: unique 2 / all 3.
    assert distinct(["你 好 好"], 1) == pytest.approx(200 / 3)
    # EVA: 你,' ',好,' ',好 without the last -> 你,' ',好,' ': unique 3 / all 4.
    assert distinct(["你 好 好"], 1, eva_compat=True) == pytest.approx(75.0)


def test_distinct_without_ngrams_is_zero():
    assert distinct(["你好", ""], 3) == 0.0


def test_distinct_rejects_bad_input():
    with pytest.raises(ValueError, match="no hypotheses"):
        distinct([], 1)
    with pytest.raises(ValueError, match="at least 1"):
        distinct(["你好"], 0)


# --- F1 ---------------------------------------------------------------------------------------

def test_unigram_f1():
    # 我爱你 vs 我爱她: overlap 2 (我 爱), P = R = 2/3, F1 = 2/3.
    assert unigram_f1(["我爱你"], ["我爱她"]) == pytest.approx(200 / 3)
    # Order does not matter: overlap 3, F1 = 1.
    assert unigram_f1(["你爱我"], ["我爱你"]) == pytest.approx(100.0)
    assert unigram_f1(["你好"], ["再见"]) == 0.0


def test_unigram_f1_counts_repeats_as_multiset():
    # 哈哈哈 vs 哈哈: overlap min(3, 2) = 2 (sets would give 1), P = 2/3, R = 1,
    # F1 = 2 * 2/3 * 1 / (5/3) = 4/5.
    assert unigram_f1(["哈哈哈"], ["哈哈"]) == pytest.approx(80.0)
    # Mean over samples: (2/3 + 4/5) / 2 = 11/15.
    assert unigram_f1(["我爱你", "哈哈哈"], ["我爱她", "哈哈"]) == pytest.approx(100 * 11 / 15)


def test_unigram_f1_empty_texts():
    assert unigram_f1([""], [""]) == 100.0  # both empty: perfect agreement
    assert unigram_f1([""], ["你好"]) == 0.0
    assert unigram_f1(["你好"], [""]) == 0.0
    assert unigram_f1([" "], ["\n"]) == 100.0  # whitespace only is empty
    # EVA divides by len(ref) (crashes); eva_compat scores every empty pair 0.
    assert unigram_f1([""], [""], eva_compat=True) == 0.0
    assert unigram_f1(["你好"], [""], eva_compat=True) == 0.0


def test_unigram_f1_eva_keeps_whitespace():
    # EVA: 我,' ',爱 vs 我,爱: overlap 2, P = 2/3, R = 1, F1 = 4/5. Clean: identical, F1 = 1.
    assert unigram_f1(["我 爱"], ["我爱"]) == pytest.approx(100.0)
    assert unigram_f1(["我 爱"], ["我爱"], eva_compat=True) == pytest.approx(80.0)


# --- ROUGE-L ----------------------------------------------------------------------------------

def test_rouge_l():
    # 我很爱你 vs 我爱你们: LCS 我爱你 = 3, P = R = 3/4, F = 3/4.
    assert rouge_l(["我很爱你"], ["我爱你们"]) == pytest.approx(75.0)
    # Order matters: 你爱我 vs 我爱你: LCS = 1, P = R = 1/3.
    assert rouge_l(["你爱我"], ["我爱你"]) == pytest.approx(100 / 3)
    # 我爱你 vs 我很爱你们: LCS 3, P = 1, R = 3/5, F1 = 2 * 0.6 / 1.6 = 0.75.
    assert rouge_l(["我爱你"], ["我很爱你们"]) == pytest.approx(75.0)


def test_rouge_l_eva_uses_beta_1_2():
    # Same pair, beta = 1.2: 2.44 * 1 * 0.6 / (0.6 + 1.44 * 1) = 1.464 / 2.04 = 0.717647.
    assert rouge_l(["我爱你"], ["我很爱你们"], eva_compat=True) == pytest.approx(100 * 1.464 / 2.04)


def test_rouge_l_empty_texts():
    assert rouge_l([""], [""]) == 100.0
    assert rouge_l(["你好"], [""]) == 0.0
    assert rouge_l([""], [""], eva_compat=True) == 0.0


def _lcs_table(a, b):
    """The textbook O(len(a) * len(b)) LCS, to check the bit-parallel one."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_matches_textbook_lcs_on_random_texts():
    rng = random.Random(0)
    for _ in range(300):
        hyp = "".join(rng.choices("你我他好", k=rng.randint(1, 15)))
        ref = "".join(rng.choices("你我他好", k=rng.randint(1, 15)))
        lcs = _lcs_table(hyp, ref)
        p, r = lcs / len(hyp), lcs / len(ref)
        expected = 100 * 2 * p * r / (p + r) if lcs else 0.0
        assert rouge_l([hyp], [ref]) == pytest.approx(expected), (hyp, ref)


# --- all metrics, errors ----------------------------------------------------------------------

def test_dialogue_metrics_worked_example():
    assert dialogue_metrics(HYPS, REFS) == CLEAN
    assert dialogue_metrics(HYPS, REFS, eva_compat=True) == EVA


@pytest.mark.parametrize("fn", [bleu4, unigram_f1, rouge_l, dialogue_metrics])
def test_pairs_are_checked(fn):
    with pytest.raises(ValueError, match="2 hypotheses and 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypothesis/reference pairs"):
        fn([], [])


# --- CLI --------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\r\n".join(REFS), encoding="utf-8")  # CRLF, no final newline
    return hyp, ref


def test_cli_prints_metrics(files, capsys):
    hyp, ref = files
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref)]) == 0
    assert json.loads(capsys.readouterr().out) == CLEAN


def test_cli_eva_compat_and_out(files, tmp_path, capsys):
    hyp, ref = files
    out = tmp_path / "report" / "metrics.json"
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref), "--eva-compat", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == EVA
    assert out.read_text(encoding="utf-8") == printed


def test_cli_line_count_mismatch(files, capsys):
    hyp, ref = files
    ref.write_text("我爱你\n", encoding="utf-8")
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref)]) == 1
    err = capsys.readouterr().err
    assert f"{ref}: line 2:" in err
    assert f"{hyp} has 2 lines but {ref} has 1" in err


def test_cli_missing_file(files, tmp_path, capsys):
    hyp, _ = files
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(tmp_path / "nope.txt")]) == 1
    assert "nope.txt: cannot read" in capsys.readouterr().err
