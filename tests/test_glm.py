"""GLM (huayu/models/glm.py): mask and 2D positions by hand, equivalence with a causal LM and a
masked LM, blank-infilling samples (huayu/data/blank_infilling.py), generation, save/load."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_token_store import DOCUMENTS, index

from huayu.data.batching import IGNORE
from huayu.data.blank_infilling import DOCUMENT, SENTENCE, TOKEN, BlankArgs, BlankInfilling, Blanks, text_budget
from huayu.data.whole_word_masking import build_samples
from huayu.models.glm import (GLMConfig, GLMForBlankInfilling, _prefix_mask, blank_layout, span_attention_mask)

V, MASK, SMASK, GMASK, SOP, EOP, PAD = 40, 34, 35, 36, 37, 38, 0


def config(**overrides) -> GLMConfig:
    return GLMConfig(**{**dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                                mask_token_id=MASK, smask_token_id=SMASK, gmask_token_id=GMASK, sop_token_id=SOP,
                                eop_token_id=EOP, pad_token_id=PAD, eos_token_id=EOP), **overrides})


def glm(seed: int = 0, scale: float | None = None, **overrides) -> GLMForBlankInfilling:
    torch.manual_seed(seed)
    model = GLMForBlankInfilling(config(**overrides)).eval()
    if scale:  # large random weights: greedy decoding wanders instead of repeating one token
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape) * scale)
    return model


# The paper's figure 2: x1 x2 [M] x4 [M] x6 with spans (x3) and (x5 x6)... written as
# Part A = x1 x2 [M] x4 [M], Part B = <sop> x5 x6 <sop> x3 (spans shuffled: the second blank first).
X = [11, 12, 13, 14, 15, 16]
PART_A = [X[0], X[1], MASK, X[3], MASK]
PART_B = [SOP, X[4], X[5], SOP, X[2]]


def test_positions_and_mask_by_hand():
    ids = torch.tensor([PART_A + PART_B])
    # the k-th <sop> fills the k-th mask: here the layout the ids imply (first span -> first [MASK])
    positions, part_a = blank_layout(ids, None, config())
    assert positions[0, 0].tolist() == [0, 1, 2, 3, 4, 2, 2, 2, 4, 4]
    assert positions[0, 1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert part_a[0].tolist() == [True] * 5 + [False] * 5
    allowed = _prefix_mask(part_a, torch.ones(1, 10, dtype=torch.bool), past=0)[0].int().tolist()
    a, b = [1] * 5, [0] * 5
    assert allowed == [a + b] * 5 + [a + [1] * (k + 1) + [0] * (4 - k) for k in range(5)]


def test_explicit_spans_give_the_same_mask_and_isolation_hides_other_spans():
    spans = torch.tensor([[0] * 5 + [1, 1, 1, 2, 2]])
    valid = torch.ones(1, 10, dtype=torch.bool)
    positions, part_a = blank_layout(torch.tensor([PART_A + PART_B]), None, config())
    assert torch.equal(span_attention_mask(spans, valid), _prefix_mask(part_a, valid, 0))
    isolated = span_attention_mask(spans, valid, isolate=True)[0].int().tolist()
    a = [1] * 5
    assert isolated[8] == a + [0, 0, 0, 1, 0] and isolated[9] == a + [0, 0, 0, 1, 1]
    assert isolated[7] == a + [1, 1, 1, 0, 0]


def test_padding_shifts_nothing():
    model = glm()
    ids = PART_A + PART_B
    alone = model(torch.tensor([ids])).logits[0]
    padded = torch.tensor([[PAD, PAD] + ids, ids + [PAD, PAD]])
    mask = torch.tensor([[0, 0] + [1] * 10, [1] * 10 + [0, 0]])
    positions, _ = blank_layout(padded, mask, model.config)
    assert positions[0, :, 2:].tolist() == positions[1, :, :10].tolist()
    logits = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, 2:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, :10], alone, atol=1e-5, rtol=1e-5)


def test_the_whole_text_as_one_span_is_a_causal_lm():
    """[MASK] <sop> x1..xn with targets x1..xn <eop>: GLM's loss equals that of transformers' GPT-2
    (pre-LN, tanh GeLU, tied output layer) given the same weights and ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = glm(seed=3)
    text = [11, 12, 13, 14, 15, 16, 17]
    ids = torch.tensor([[MASK, SOP] + text])
    labels = torch.tensor([[IGNORE] + text + [EOP]])
    positions, _ = blank_layout(ids, None, model.config)
    assert positions[0, 0].tolist() == [0] * 9 and positions[0, 1].tolist() == list(range(9))
    glm_loss = model(ids, labels=labels).loss

    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True)).eval()
    g, t = model.glm, gpt.transformer
    with torch.no_grad():
        t.wte.weight.copy_(g.word_embeddings.weight)
        t.wpe.weight.copy_(g.block_position_embeddings.weight + g.position_embeddings.weight[0])
        for mine, theirs in zip(g.layers, t.h):
            a = mine.attention
            theirs.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T)
            theirs.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            theirs.attn.c_proj.weight.copy_(a.o_proj.weight.T)
            theirs.attn.c_proj.bias.copy_(a.o_proj.bias)
            theirs.mlp.c_fc.weight.copy_(mine.mlp.up_proj.weight.T)
            theirs.mlp.c_fc.bias.copy_(mine.mlp.up_proj.bias)
            theirs.mlp.c_proj.weight.copy_(mine.mlp.down_proj.weight.T)
            theirs.mlp.c_proj.bias.copy_(mine.mlp.down_proj.bias)
            for ours, gpts in ((mine.input_layernorm, theirs.ln_1), (mine.post_attention_layernorm, theirs.ln_2)):
                gpts.weight.copy_(ours.weight)
                gpts.bias.copy_(ours.bias)
        t.ln_f.weight.copy_(g.final_layernorm.weight)
        t.ln_f.bias.copy_(g.final_layernorm.bias)
    # GPT-2 shifts its labels: position t is predicted from t-1
    gpt_loss = gpt(ids := torch.tensor([[MASK, SOP] + text + [EOP]]), labels=torch.tensor([[IGNORE, IGNORE] + text + [EOP]])).loss
    assert ids.shape[1] == 10
    torch.testing.assert_close(glm_loss, gpt_loss, atol=1e-5, rtol=1e-5)


def test_single_token_spans_predict_like_a_masked_lm():
    """Isolated single-token spans: each blank's prediction comes from Part A alone, whatever the
    other spans hold or their order (as a masked LM predicts every [MASK] from the input alone)."""
    model = glm(seed=1, scale=0.5)
    part_a = [11, MASK, 13, MASK, 15, MASK]
    blanks = [1, 3, 5]

    def span_logits(order: list[int], fillers: list[int], isolate=True):
        ids = part_a + [t for k in order for t in (SOP, fillers[k])]
        spans = [0] * 6 + [j + 1 for j in range(len(order)) for _ in (0, 1)]
        positions = [list(range(6)) + [blanks[k] for k in order for _ in (0, 1)], [0] * 6 + [1, 2] * len(order)]
        mask = span_attention_mask(torch.tensor([spans]), torch.ones(1, len(ids), dtype=torch.bool), isolate)
        logits = model(torch.tensor([ids]), attention_mask=mask, position_ids=torch.tensor([positions])).logits[0]
        return {k: logits[6 + 2 * j] for j, k in enumerate(order)}  # at each span's <sop>

    alone = {k: span_logits([k], [20, 21, 22])[k] for k in range(3)}
    for order, fillers in (([0, 1, 2], [20, 21, 22]), ([2, 0, 1], [25, 26, 27])):
        together = span_logits(order, fillers)
        for k in range(3):
            torch.testing.assert_close(together[k], alone[k], atol=1e-5, rtol=1e-5)
    # GLM's own mask lets a later span see the earlier ones: what they hold then matters
    first, second = span_logits([0, 1, 2], [20, 21, 22], False), span_logits([0, 1, 2], [25, 26, 27], False)
    torch.testing.assert_close(first[0], second[0])
    assert not torch.allclose(first[2], second[2])


def test_generate_with_the_cache_matches_decoding_without_it():
    model = glm(seed=2, scale=0.5)
    prompts = [[11, 12, 13, GMASK, SOP], [14, 15, MASK, 16, 17, 18, SOP]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD)[:, width:]
    for row, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out[row].tolist() == seq[0, len(prompt):].tolist()
    assert len(set(out[0].tolist())) > 1  # the comparison is not between two runs of one repeated token


def test_save_and_load_through_the_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    for tied in (True, False):
        model = glm(seed=4, tie_word_embeddings=tied)
        model.save_pretrained(tmp_path / str(tied))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(tied)).eval()
        assert type(loaded) is GLMForBlankInfilling and AutoConfig.from_pretrained(tmp_path / str(tied)).sop_token_id == SOP
        assert (loaded.lm_head.weight.data_ptr() == loaded.glm.word_embeddings.weight.data_ptr()) is tied
        ids = torch.tensor([PART_A + PART_B])
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # a fresh interpreter: `import huayu` alone makes plain transformers know the model type
    code = ("import huayu, sys; from transformers import AutoModelForCausalLM; "
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "True")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "GLMForBlankInfilling"


# ---------------------------------------------------------------------------------------- blank infilling

@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir):
    return index(tmp_path_factory.mktemp("store"), tokenizer_dir, DOCUMENTS * 50)


def reconstruct(example: dict, sop: int, eop: int) -> tuple[list[int], list[list[int]]]:
    """The original text from Part A and Part B's labels, and the spans in Part B order."""
    ids, labels, positions = example["input_ids"], example["labels"], example["position_ids"]
    n_a = int((labels == IGNORE).sum())
    starts = list(np.flatnonzero(ids[n_a:] == sop)) + [len(ids) - n_a]
    spans, by_position = [], {}
    for s, e in zip(starts, starts[1:]):
        span = labels[n_a + s:n_a + e]
        assert span[-1] == eop and (positions[1, n_a + s:n_a + e] == np.arange(1, e - s + 1)).all()
        assert (positions[0, n_a + s:n_a + e] == positions[0, n_a + s]).all()
        by_position[int(positions[0, n_a + s])] = span[:-1].tolist()
        spans.append(span[:-1].tolist())
    text = [t for j, token in enumerate(ids[:n_a]) for t in by_position.get(j, [int(token)])]
    return text, spans


def test_samples_hold_the_text_and_part_b_is_shuffled(store, glm_tokenizer):
    collate = BlankInfilling(store, glm_tokenizer, 64, BlankArgs(sentence_ratio=0.3, document_ratio=0.3))
    samples = build_samples(store, np.arange(store.n_documents), text_budget(64, 0.15) + 2, 0.0, False, 0)
    rng = np.random.default_rng(0)
    in_order = shuffled = 0
    for sample in samples[:300]:
        tokens, sentences = collate.sample_tokens(sample)
        blanks = collate.blanks(len(tokens), sentences, rng)
        example = collate.example(tokens, blanks, rng)
        assert len(example["input_ids"]) == len(tokens) + 2 * len(blanks.spans) <= 64
        text, spans = reconstruct(example, collate.sop, collate.eop)
        assert text == tokens.tolist()
        if len(spans) > 1:
            original = [tokens[s:e].tolist() for s, e in blanks.spans]
            in_order += spans == original
            shuffled += spans != original
    assert shuffled > in_order > 0


def test_token_level_spans_are_poisson_and_cover_15_percent(store, glm_tokenizer):
    collate = BlankInfilling(store, glm_tokenizer, 512, BlankArgs())
    rng = np.random.default_rng(1)
    lengths, covers = [], []
    for _ in range(3000):
        spans = collate.token_spans(400, rng)
        assert (spans[1:, 0] > spans[:-1, 1]).all() and spans[0, 0] >= 0 and spans[-1, 1] <= 400  # apart
        lengths += (spans[:, 1] - spans[:, 0]).tolist()
        covers.append((spans[:, 1] - spans[:, 0]).sum() / 400)
    assert min(covers) >= 0.15 and np.mean(covers) == pytest.approx(0.15, abs=0.01)
    # Poisson(3) without zeros: mean 3 / (1 - e^-3), P(1) = 3 e^-3 / (1 - e^-3)
    lengths = np.asarray(lengths)
    assert lengths.min() >= 1
    assert lengths.mean() == pytest.approx(3 / (1 - math.exp(-3)), abs=0.08)
    assert (lengths == 1).mean() == pytest.approx(3 * math.exp(-3) / (1 - math.exp(-3)), abs=0.015)


def test_sentence_spans_are_whole_sentences_and_document_spans_end_the_text(store, glm_tokenizer):
    collate = BlankInfilling(store, glm_tokenizer, 128, BlankArgs(sentence_ratio=0.5, document_ratio=0.5))
    rng = np.random.default_rng(2)
    samples = build_samples(store, np.arange(store.n_documents), text_budget(128, 0.15) + 2, 0.0, False, 0)
    seen = {TOKEN: 0, SENTENCE: 0, DOCUMENT: 0}
    draws = np.repeat(samples, 1 + 600 // len(samples), axis=0)
    for sample in draws:
        tokens, sentences = collate.sample_tokens(sample)
        blanks = collate.blanks(len(tokens), sentences, rng)
        seen[blanks.objective] += 1
        bounds = {tuple(s) for s in sentences.tolist()}
        if blanks.objective == SENTENCE:
            assert {tuple(s) for s in blanks.spans.tolist()} <= bounds
            assert blanks.spans.shape[0] < len(sentences)
        elif blanks.objective == DOCUMENT:
            (start, end), = blanks.spans.tolist()
            assert end == len(tokens) and len(tokens) / 2 <= end - start <= len(tokens)
        example = collate.example(tokens, blanks, rng)
        mask = {TOKEN: collate.mask_of[TOKEN], SENTENCE: collate.mask_of[SENTENCE],
                DOCUMENT: collate.mask_of[DOCUMENT]}[blanks.objective]
        n_a = int((example["labels"] == IGNORE).sum())
        assert (example["input_ids"][:n_a] == mask).sum() == len(blanks.spans)
    assert seen[DOCUMENT] / len(draws) == pytest.approx(0.5, abs=0.06)
    assert seen[SENTENCE] > 0.3 * len(draws)  # the rest of the half, but samples of one sentence fall back


def test_a_sample_too_long_for_its_spans_loses_its_last_spans(store, glm_tokenizer):
    collate = BlankInfilling(store, glm_tokenizer, 20, BlankArgs())
    tokens = np.arange(100, 118)
    example = collate.example(tokens, Blanks(np.array([[0, 1], [3, 4], [6, 7]]), TOKEN), np.random.default_rng(0))
    assert len(example["input_ids"]) == 18 + 2 == 20
    assert reconstruct(example, collate.sop, collate.eop)[0] == tokens.tolist()


def test_bad_ratios_are_refused(store, glm_tokenizer):
    from huayu.errors import HuayuError

    with pytest.raises(HuayuError, match="add up to at most 1"):
        BlankInfilling(store, glm_tokenizer, 64, BlankArgs(sentence_ratio=0.6, document_ratio=0.6))
    with pytest.raises(HuayuError, match="--blank-ratio"):
        BlankInfilling(store, glm_tokenizer, 64, BlankArgs(blank_ratio=1.5))


# ------------------------------------------------------------------------------------ cloze classification

def test_cloze_scores_each_candidate_as_if_it_were_alone(lively_glm_dir):
    from huayu.data.cloze import Cloze, ClozeEncoder, cloze_collate, cloze_scores
    from huayu.models.loading import load_for_inference

    tokenizer, model = load_for_inference(lively_glm_dir)
    model.eval()
    cloze = Cloze("[MASK]：{text}", ["0", "1", "2"], ["不好", "好", "我很好"])
    encoder = ClozeEncoder(tokenizer, cloze, max_length=40)
    texts = ["今天天气很好，适合出去走走。", "我有点累了"]
    scores = cloze_scores(model, cloze_collate(tokenizer.pad_token_id)(encoder.encode(texts)))
    sop = tokenizer.convert_tokens_to_ids("<sop>")
    for row, text in enumerate(texts):
        part_a = tokenizer(cloze.pattern.replace("{text}", text), add_special_tokens=False)["input_ids"]
        for k, word in enumerate(cloze.words):
            w = tokenizer(word, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([part_a + [sop] + w[:-1]])).logits[0], -1)
            alone = sum(logp[len(part_a) + i, t] for i, t in enumerate(w))
            torch.testing.assert_close(scores[row, k], alone, atol=1e-4, rtol=1e-4)


def test_verbalizers_must_name_every_class_once():
    from huayu.data.cloze import parse_verbalizer
    from huayu.errors import HuayuError

    assert parse_verbalizer(["1:好", "0:差"], ["0", "1"], "{text}[MASK]").words == ["差", "好"]
    for specs, message in ((["1:好"], "no word for the label"), (["1:好", "0:差", "2:中"], "does not have"),
                           (["1:好", "0:好"], "same word"), (["1好", "0:差"], "LABEL:WORD")):
        with pytest.raises(HuayuError, match=message):
            parse_verbalizer(specs, ["0", "1"], "{text}[MASK]")


# --------------------------------------------------------------------------------------- end to end

def test_pretrain_fill_chat_sft_and_cloze_classification(tmp_path, store, tokenizer_dir, capsys):
    """The tiny end-to-end run of the GLM family: every stage through the CLI."""
    import huayu
    from conftest import write_conversations
    from huayu.cli import main

    pt, sft, cls = (str(tmp_path / name) for name in ("pt", "sft", "cls"))
    assert main(["pretrain", "--model", "glm-tiny", "--tokenizer", tokenizer_dir, "--objective", "blank",
                 "--data", store.prefix, "--seq-len", "64", "--batch-size", "8", "--max-steps", "12",
                 "--eval-every", "6", "--eval-samples", "16", "--lr", "3e-3", "--out", pt]) == 0
    assert (tmp_path / "pt" / "loss_curve.png").exists()
    capsys.readouterr()
    assert main(["generate", pt, "--fill", "--prompt", "春天来了，[MASK]都开了。", "--max-new-tokens", "3"]) == 0
    filled = capsys.readouterr().out.strip()
    assert filled.startswith("春天来了，") and filled.endswith("都开了。") and "[MASK]" not in filled

    dialogues = write_conversations(tmp_path / "dialogues.jsonl")
    assert main(["sft", "--model", pt, "--data", dialogues, "--max-steps", "40", "--batch-size", "4",
                 "--lr", "3e-3", "--out", sft]) == 0
    reply, history = huayu.load(sft).chat("你好", max_new_tokens=8)
    assert reply and len(history) == 2
    prefix = str(tmp_path / "prefix")  # P-Tuning v2: the learned prefix is a cache GLM attends to
    assert main(["sft", "--model", pt, "--data", dialogues, "--max-steps", "4", "--batch-size", "4",
                 "--finetuning-type", "prefix", "--out", prefix]) == 0
    assert huayu.load(prefix).chat("你好", max_new_tokens=4)[0] is not None
    assert main(["eval", sft, "--data", dialogues, "--max-new-tokens", "8", "--out", str(tmp_path / "eval")]) == 0

    rows = "".join(f"{t}\t{y}\n" for t, y in (("春天来了，花都开了。", 1), ("我有点累了", 0), ("读书让人快乐", 1),
                                                ("问题和答案。再见", 0)) * 4)
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + rows, encoding="utf-8")
    train = str(tmp_path / "train.tsv")
    assert main(["finetune-cls", pt, "--train", train, "--dev", train, "--test", train, "--verbalizer", "1:好",
                 "0:累", "--max-steps", "20", "--batch-size", "8", "--eval-every", "10", "--lr", "3e-3",
                 "--out", cls]) == 0
    predictions = (tmp_path / "cls" / "test_predictions.tsv").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == 16 and {p.split("\t")[0] for p in predictions} <= {"0", "1"}
    assert (tmp_path / "cls" / "cloze.json").exists() and (tmp_path / "cls" / "best").is_dir()


def test_glm_needs_a_verbalizer_and_fill_needs_a_glm(tmp_path, tiny_model_dir, lively_glm_dir, capsys):
    from huayu.cli import main

    (tmp_path / "t.tsv").write_text("text\tlabel\n好\t1\n差\t0\n", encoding="utf-8")
    t = str(tmp_path / "t.tsv")
    assert main(["finetune-cls", lively_glm_dir, "--train", t, "--dev", t, "--out", str(tmp_path / "c")]) != 0
    assert "--verbalizer has no word" in capsys.readouterr().err
    assert main(["generate", tiny_model_dir, "--fill", "--prompt", "你[MASK]"]) != 0
    assert "blank filling needs a GLM" in capsys.readouterr().err
    assert main(["generate", lively_glm_dir, "--fill", "--prompt", "你好"]) != 0
    assert "nothing to fill" in capsys.readouterr().err


def test_show_masked_prints_blank_infilling_samples(store, capsys):
    from huayu.cli import main

    assert main(["data", "show-masked", store.prefix, "--objective", "blank", "--samples", "2", "--seq-len", "48"]) == 0
    out = capsys.readouterr().out
    assert out.count("part A:") == 2 and "<sop>" in out and "<eop>" in out
