"""`huayu chat` does what its flags and the model say (issue 18): decoding flags override only what
they name, on top of the model's generation_config.json; a huge seed, `clear` piped and a model never
tuned for chat each get a message, on stderr when piped; `--help` shows the defaults that run."""

import dataclasses
import io
import json
import shutil
import sys
import warnings

import pytest

import huayu
from huayu.api import chat_decoding
from huayu.cli import main
from huayu.generation import EVA_BEAM, Generator, TemplateWarning

# what the model's authors chose, as a downloaded checkpoint's generation_config.json says it
MODEL_CHOICE = dict(do_sample=True, temperature=0.5, top_k=20, max_new_tokens=10)


@pytest.fixture(scope="module")
def sampling_model_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("sampling") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "generation_config.json").write_text(json.dumps({**MODEL_CHOICE, "eos_token_id": 3}))
    return str(path)


@pytest.fixture(scope="module")
def untuned_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with no chat template: pre-trained only, as far as anyone can tell."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("untuned") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return str(path)


def piped_chat(monkeypatch, text, *argv, merged=False):
    """(stdout, stderr) of `huayu chat ARGV` in this process with `text` piped in; `merged`: both in one."""
    out = io.StringIO()
    err = out if merged else io.StringIO()
    for name, stream in [("stdin", io.StringIO(text)), ("stdout", out), ("stderr", err)]:
        monkeypatch.setattr(sys, name, stream)
    assert main(["chat", *argv]) == 0, err.getvalue()
    return out.getvalue(), err.getvalue()


def decodings_used(monkeypatch, model_dir, *flags):
    """The DecodingArgs each reply of `huayu chat MODEL_DIR FLAGS` is generated with."""
    seen = []
    stream_ids = Generator.stream_ids
    monkeypatch.setattr(Generator, "stream_ids", lambda self, prompt, d: seen.append(d) or stream_ids(self, prompt, d))
    piped_chat(monkeypatch, "你好\n", model_dir, *flags)
    return seen


MODEL_LAYER = dataclasses.replace(chat_decoding(), **MODEL_CHOICE)


@pytest.mark.parametrize("flags,expected", [
    ([], MODEL_LAYER),
    (["--max-new-tokens", "24"], dataclasses.replace(MODEL_LAYER, max_new_tokens=24)),
    (["--temperature", "0.7"], dataclasses.replace(MODEL_LAYER, temperature=0.7)),  # chat's default, yet named
    (["--beam", "--max-new-tokens", "24"], dataclasses.replace(MODEL_LAYER, **EVA_BEAM, max_new_tokens=24)),
    (["--beam", "--repetition-penalty", "1.3"], dataclasses.replace(MODEL_LAYER, **{**EVA_BEAM,
                                                                                      "repetition_penalty": 1.3})),
])
def test_decoding_flags_override_only_what_they_name(monkeypatch, sampling_model_dir, flags, expected):
    assert decodings_used(monkeypatch, sampling_model_dir, *flags) == [expected]


def test_a_config_file_overrides_like_flags(monkeypatch, sampling_model_dir, tmp_path):
    config = tmp_path / "chat.yaml"
    config.write_text("decoding:\n  temperature: 0.7\n  top_p: 0.8\n")
    expected = dataclasses.replace(MODEL_LAYER, temperature=0.7, top_p=0.8)
    assert decodings_used(monkeypatch, sampling_model_dir, "--config", str(config)) == [expected]


def test_max_new_tokens_alone_still_samples(monkeypatch, sampling_model_dir):
    text = "seed 1\n你好\nclear\nseed 2\n你好\nclear\nseed 1\n你好\n"
    replies, _ = piped_chat(monkeypatch, text, sampling_model_dir, "--max-new-tokens", "24")
    first, other_seed, first_again = replies.splitlines()
    assert first == first_again and first != other_seed


def test_the_api_chats_with_the_models_choice_and_keywords_on_top(sampling_model_dir):
    model = huayu.load(sampling_model_dir)
    assert model.decoding == MODEL_LAYER
    seen = []
    generate_ids = model.generator.generate_ids
    model.generator.generate_ids = lambda prompts, d: seen.append(d) or generate_ids(prompts, d)
    model.chat("你好", max_new_tokens=3)
    assert seen == [dataclasses.replace(MODEL_LAYER, max_new_tokens=3)]


def test_a_seed_out_of_range_is_a_message_not_a_traceback(monkeypatch, tiny_model_dir):
    replies, said = piped_chat(monkeypatch, "seed 99999999999999999999999\n你好\n", tiny_model_dir,
                               "--max-new-tokens", "3")
    assert "seed 99999999999999999999999 is out of range" in said and len(replies.splitlines()) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
    assert main(["chat", tiny_model_dir, "--seed", str(2**64)]) == 1
    assert f"huayu chat: error: seed {2**64} is out of range" in sys.stderr.getvalue()


def test_piped_commands_report_on_stderr(monkeypatch, tiny_model_dir):
    replies, said = piped_chat(monkeypatch, "你好\nclear\nseed 3\n你好\n", tiny_model_dir, "--max-new-tokens", "3")
    assert len(replies.splitlines()) == 2
    assert said.splitlines() == ["(new dialogue)", "(seed 3)"]


def test_a_model_never_tuned_for_chat_is_warned_about_once_first(monkeypatch, untuned_model_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both, _ = piped_chat(monkeypatch, "你好\n你是谁？\n", untuned_model_dir, "--max-new-tokens", "3", merged=True)
    lines = both.splitlines()
    assert lines[0].startswith("huayu chat: warning: ") and "has no chat template" in lines[0]
    assert len(lines) == 3 and "warning" not in "".join(lines[1:])
    assert not [w for w in caught if issubclass(w.category, TemplateWarning)]  # not said twice


def test_help_shows_the_defaults_that_run(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for text in ["sample instead of greedy/beam search (default: True)", "sampling temperature (default: 0.7)",
                 "nucleus sampling mass (1.0: off) (default: 0.9)",
                 "penalty for repeating tokens (1.0: off) (default: 1.2)"]:
        assert text in shown
