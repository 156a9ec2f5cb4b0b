"""Shared fixtures: a tiny char tokenizer and tiny corpora written by the tests themselves."""

from __future__ import annotations

import json
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HUAYU_CACHE"] = tempfile.mkdtemp(prefix="huayu-test-cache-")  # never the user's cache

DIALOGUES = [
    ["你好", "你好，很高兴认识你。"],
    ["你是谁？", "我是一个小小的聊天模型。", "你会做什么？", "我会陪你聊天。"],
    ["今天天气怎么样？", "今天天气很好，适合出去走走。"],
    ["我有点累了", "那就好好休息一下吧。", "谢谢你", "不客气。"],
    ["你喜欢什么？", "我喜欢读书和听音乐。"],
    ["晚安", "晚安，做个好梦。"],
]
TEXTS = ["春天来了，花都开了。", "我们一起去公园散步吧。", "学习使人进步，读书让人快乐。", "问题和答案。再见，拜拜！"]


def load_script(path):
    """A benchmark script (benchmarks/*.py, not a package) imported as a module, to test its parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_conversations(path, dialogues=DIALOGUES) -> str:
    roles = ("user", "assistant")
    with open(path, "w", encoding="utf-8") as f:
        for turns in dialogues:
            msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return str(path)


def write_texts(path, texts=TEXTS * 20) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from huayu.tokenizer import train_tokenizer

    texts = TEXTS + [t for d in DIALOGUES for t in d]
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, kind="char", vocab_size=400).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def save_preset(preset: str, tokenizer, path) -> str:
    """A preset model saved like a downloaded checkpoint (config.json + safetensors + tokenizer)."""
    from huayu.models.loading import load_model

    load_model(preset, tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_preset("tiny", tokenizer, tmp_path_factory.mktemp("model"))


def save_lively(preset: str, tokenizer, path, scale: float = 0.3, keep_norms: bool = False) -> str:
    """A preset with large random weights (`keep_norms`: not its layer norms'), so that greedy
    decoding wanders over the vocabulary instead of repeating one token: decoders can then be
    compared token by token."""
    import torch

    from huayu.models.loading import load_model

    model = load_model(preset, tokenizer, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (keep_norms and "norm" in name):
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory, tokenizer):
    return save_lively("tiny", tokenizer, tmp_path_factory.mktemp("lively"))


@pytest.fixture(scope="session")
def glm_tokenizer(tokenizer_dir):
    """The test tokenizer with GLM's tokens added, as huayu loads it for a GLM preset."""
    from huayu.models.loading import load_tokenizer

    return load_tokenizer("glm-tiny", tokenizer_dir)


@pytest.fixture(scope="session")
def lively_glm_dir(tmp_path_factory, glm_tokenizer):
    return save_lively("glm-tiny", glm_tokenizer, tmp_path_factory.mktemp("lively-glm"), scale=0.6, keep_norms=True)
