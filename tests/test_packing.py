from huayu.data.batching import IGNORE, pad_collate
from huayu.data.formats import TextRecord
from huayu.data.packing import pack, tokenize_records


def test_documents_are_joined_with_eos_and_cut_into_full_blocks(tokenizer):
    records = [TextRecord("春天来了", None, "a:1"), TextRecord("花开了", None, "a:2")]
    blocks = pack(tokenize_records(tokenizer, records), seq_len=4)
    eos = tokenizer.eos_token_id
    ids = [int(i) for b in blocks for i in b.input_ids]
    assert ids == tokenizer("春天来了", add_special_tokens=False)["input_ids"] + [eos] + \
        tokenizer("花开了", add_special_tokens=False)["input_ids"] + [eos]
    assert [len(b.input_ids) for b in blocks] == [4, 4, 1]  # 9 tokens: no padding, nothing dropped
    assert all((b.labels == b.input_ids).all() for b in blocks)


def test_input_output_records_learn_only_the_target(tokenizer):
    records = [TextRecord("问题", "答案", "a:1")]
    (block,) = pack(tokenize_records(tokenizer, records), seq_len=16)
    assert tokenizer.decode(block.input_ids) == "问题答案</s>"
    assert list(block.labels[:2]) == [IGNORE, IGNORE]
    assert tokenizer.decode(block.labels[2:]) == "答案</s>"


def test_collate_pads_right_and_masks(tokenizer):
    records = [TextRecord("春天来了", None, "a:1")]
    blocks = pack(tokenize_records(tokenizer, records), seq_len=3)
    batch = pad_collate(tokenizer.pad_token_id)(blocks)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"][1, 2].item() == IGNORE
