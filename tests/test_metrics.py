"""Dialogue metrics against hand-computed values (arithmetic in the comments): EVA's conventions
and their --eva-compat differences, ChatGLM's ADGEN conventions, and the CLI."""

import json
import math
import random

import pytest

from huayu.cli import main
from huayu.evaluation.metrics import (
    adgen_metrics,
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
# The ADGEN worked example of docs/metrics.md.
ADGEN_HYPS = ["这件连衣裙很漂亮", "我爱北京"]
ADGEN_REFS = ["这件裙子很漂亮", "我爱北京天安门"]
ADGEN = {"rouge-1": 76.1905, "rouge-2": 40.0, "rouge-l": 76.1905, "bleu-4": 37.1454}


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


# --- ChatGLM / ADGEN (ptuning/main.py compute_metrics) --------------------------------------

def test_adgen_segments_with_jieba():
    import jieba

    # The words the ROUGE arithmetic below relies on (jieba's default dictionary).
    assert list(jieba.cut("这件连衣裙很漂亮")) == ["这件", "连衣裙", "很漂亮"]
    assert list(jieba.cut("这件裙子很漂亮")) == ["这件", "裙子", "很漂亮"]
    assert list(jieba.cut("我爱北京")) == ["我", "爱", "北京"]
    assert list(jieba.cut("我爱北京天安门")) == ["我", "爱", "北京", "天安门"]


def test_adgen_rouge_on_words_bleu_on_characters():
    # ROUGE, words 这件 连衣裙 很漂亮 vs 这件 裙子 很漂亮: 1-grams overlap 2, P = R = 2/3, F = 2/3;
    # 2-grams (这件,连衣裙) (连衣裙,很漂亮) vs (这件,裙子) (裙子,很漂亮): none; LCS 2, F = 2/3.
    # BLEU on characters, 8 vs 7: p1 = 6/8 (这件裙很漂亮), p2 = 3/7 (这件 很漂 漂亮), p3 = 1/6 (很漂亮),
    # p4 = 0/5 -> method3 1/(2*5). c = 8 > r = 7: BP = 1. BLEU = (3/4 * 3/7 * 1/6 * 1/10) ** (1/4).
    assert adgen_metrics(ADGEN_HYPS[:1], ADGEN_REFS[:1]) == {
        "rouge-1": 66.6667, "rouge-2": 0.0, "rouge-l": 66.6667,
        "bleu-4": round(100 * (3 / 560) ** 0.25, 4)}  # 27.0541
    # ROUGE, 我 爱 北京 vs 我 爱 北京 天安门: 1-grams P = 1, R = 3/4, F = 6/7; 2-grams P = 2/2,
    # R = 2/3, F = 4/5; LCS 3, F = 6/7. BLEU: every n-gram of 我爱北京 matches (p_n = 1) but
    # c = 4 < r = 7: BLEU = BP = exp(1 - 7/4).
    assert adgen_metrics(ADGEN_HYPS[1:], ADGEN_REFS[1:]) == {
        "rouge-1": 85.7143, "rouge-2": 80.0, "rouge-l": 85.7143, "bleu-4": round(100 * math.exp(-0.75), 4)}


def test_adgen_averages_sample_scores():
    # Means of the two samples above: (66.6667 + 85.7143)/2, (0 + 80)/2, (27.0541 + 47.2367)/2.
    assert adgen_metrics(ADGEN_HYPS, ADGEN_REFS) == ADGEN


def test_adgen_sentence_bleu_is_not_100_for_short_identical_texts():
    # 你好 vs 你好: p1 = p2 = 1, no 3- or 4-grams: 0/1 -> 1/2 and 1/4 (method3). BLEU = (1/8) ** (1/4).
    # One word (你好) has no word bigram, so ROUGE-2 is 0 even for identical texts.
    assert adgen_metrics(["你好"], ["你好"]) == {
        "rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0, "bleu-4": round(100 * 0.125 ** 0.25, 4)}


def test_adgen_bleu_keeps_whitespace():
    # BLEU sees 你,' ',好 vs 你,好: p1 = 2/3, p2 = 0/2 -> 1/(2*2), p3 = 0/1 -> 1/4, p4 = 0/1 -> 1/8;
    # c = 3 > r = 2. ROUGE sees the words 你 好 vs 你好: nothing in common.
    assert adgen_metrics(["你 好"], ["你好"]) == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": round(100 * (1 / 192) ** 0.25, 4)}


def test_adgen_empty_text_scores_zero():
    # rouge_chinese raises "Hypothesis is empty." (ChatGLM's script would crash); huayu scores 0.
    zero = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert adgen_metrics([""], ["你好"]) == zero
    assert adgen_metrics([" \n"], ["你好"]) == zero
    assert adgen_metrics(["你好"], [""]) == zero
    # Mean over samples: the empty one counts as 0.
    assert adgen_metrics(["你好", ""], ["你好", "再见"])["rouge-1"] == 50.0


def _chatglm_compute_metrics(decoded_preds, decoded_labels):
    """ChatGLM-6B ptuning/main.py compute_metrics, after decoding, line for line."""
    import jieba
    import numpy as np
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(decoded_preds, decoded_labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        rouge = Rouge()
        scores = rouge.get_scores(' '.join(hypothesis), ' '.join(reference))
        result = scores[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    for k, v in score_dict.items():
        score_dict[k] = float(np.mean(v))
    return score_dict


def test_adgen_matches_chatglm_code():
    # Several sentences, punctuation, Latin text and repeats (ROUGE-1/2 count each n-gram once).
    hyps = ["这款连衣裙采用了简约的设计，显得非常优雅。适合日常穿着！", "好好好，我知道了。", "T恤 很舒服",
            "今天天气很好。我们去公园吧", "简约而不简单的牛仔外套"]
    refs = ["简约的连衣裙设计，优雅大方。日常穿着很合适。", "好的，我知道了", "这件T恤穿着很舒服。",
            "今天天气不错，我们去公园散步吧。", "牛仔外套，简约而不简单，百搭又时尚"]
    expected = _chatglm_compute_metrics(hyps, refs)
    assert adgen_metrics(hyps, refs) == {k: round(v, 4) for k, v in expected.items()}


# --- CLI --------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\r\n".join(REFS), encoding="utf-8")  # CRLF, no final newline
    return hyp, ref


def test_cli_prints_both_conventions(files, capsys):
    hyp, ref = files
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref)]) == 0
    assert json.loads(capsys.readouterr().out) == {"eva": CLEAN, "adgen": adgen_metrics(HYPS, REFS)}


def test_cli_one_convention_is_flat(files, capsys):
    hyp, ref = files
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref), "--convention", "eva"]) == 0
    assert json.loads(capsys.readouterr().out) == CLEAN
    hyp.write_text("\n".join(ADGEN_HYPS), encoding="utf-8")
    ref.write_text("\n".join(ADGEN_REFS), encoding="utf-8")
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref), "--convention", "adgen"]) == 0
    assert json.loads(capsys.readouterr().out) == ADGEN


def test_cli_eva_compat_and_out(files, tmp_path, capsys):
    hyp, ref = files
    out = tmp_path / "report" / "metrics.json"
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref), "--eva-compat", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["eva"] == EVA
    assert out.read_text(encoding="utf-8") == printed


def test_cli_eva_compat_needs_eva(files, capsys):
    hyp, ref = files
    assert main(["metrics", "--hyp", str(hyp), "--ref", str(ref), "--convention", "adgen", "--eva-compat"]) == 1
    assert "no effect with --convention adgen" in capsys.readouterr().err


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
