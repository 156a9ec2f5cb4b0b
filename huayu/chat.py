"""`huayu chat`: multi-turn chat in the terminal, or one reply per line of piped stdin.

Commands, as in EVA's interactive demo: `clear` starts a new dialogue, `seed N` sets the random
seed, `stop` or `exit` quits. With piped input nothing but the replies is printed, one per line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from huayu.api import chat_decoding
from huayu.config import add_config_arguments, config_from_args, field_doc
from huayu.generation import EVA_BEAM, DecodingArgs


@dataclass
class ChatConfig:
    model: str = field_doc("model directory (or a LoRA/prefix adapter directory whose base is known); default: huayu's "
                           "bundled chat model",
                           positional=True, default=None)
    adapter: str | None = field_doc("LoRA or prefix adapter directory applied on top of MODEL", default=None)
    decoding: DecodingArgs = field_doc("decoding", default_factory=chat_decoding)
    beam: bool = field_doc("use EVA's beam-search preset (4 beams, length and repetition penalty 1.6)",
                           default=False)
    seed: int = field_doc("random seed for sampling", default=1234)
    max_source_length: int = field_doc("max tokens of dialogue history fed to the model", default=512)
    system: str | None = field_doc("optional system message", default=None)


class ChatSession:
    """A dialogue in progress: the history and the commands that act on it."""

    def __init__(self, generator, cfg: ChatConfig):
        import torch

        self.generator, self.cfg = generator, cfg
        self.decoding = DecodingArgs(**{**cfg.decoding.__dict__, **(EVA_BEAM if cfg.beam else {})})
        torch.manual_seed(cfg.seed)
        self.clear()

    def clear(self) -> None:
        self.history = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []

    def command(self, line: str) -> str | None:
        """Handle a command word; return a status message, or None if `line` is not a command."""
        import torch

        words = line.split()
        if words == ["clear"]:
            self.clear()
            return "(new dialogue)"
        if len(words) == 2 and words[0] == "seed" and words[1].lstrip("-").isdigit():
            torch.manual_seed(int(words[1]))
            return f"(seed {words[1]})"
        return None

    def reply(self, text: str):
        """Stream the reply to `text`, then add both turns to the history."""
        self.history.append({"role": "user", "content": text})
        prompt = self.generator.encode_chat(self.history, self.cfg.max_source_length)
        pieces = []
        for piece in self.generator.stream_ids(prompt, self.decoding):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})


def add_arguments(parser) -> None:
    add_config_arguments(parser, ChatConfig)


def run(args) -> int:
    from huayu.generation import Generator
    from huayu.models.loading import model_or_bundled

    cfg = config_from_args(ChatConfig, args)
    cfg.model = model_or_bundled(cfg.model)
    session = ChatSession(Generator.load(cfg.model, adapter=cfg.adapter), cfg)
    interactive = sys.stdin.isatty()
    if interactive:
        print("输入 clear 开始新对话，seed N 设置随机种子，stop 或 exit 退出。")
    while True:
        try:
            line = input("用户 >>> " if interactive else "").strip()
        except EOFError:
            break
        if line in ("stop", "exit"):
            break
        if not line:
            continue
        status = session.command(line)
        if status is not None:
            if interactive:
                print(status)
            continue
        if interactive:
            print("模型 >>> ", end="", flush=True)
            for piece in session.reply(line):
                print(piece, end="", flush=True)
            print()
        else:
            print("".join(session.reply(line)).replace("\n", " ").strip(), flush=True)
    return 0
