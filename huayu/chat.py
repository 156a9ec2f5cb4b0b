"""`huayu chat`: multi-turn chat in the terminal, or one reply per line of piped stdin.

Commands, as in EVA's interactive demo: `clear` starts a new dialogue, `seed N` sets the random
seed, `stop` or `exit` quits. With piped input stdout holds nothing but the replies, one per line;
what commands say goes to stderr.

Decoding layers, each changing only what it names: huayu's chat defaults, the model's own
generation_config.json, `--beam`, then the decoding options the user set (flags or `--config`).

With `--tools calculator,equation` (huayu/plugins.py) the model is shown those tools; when a reply
calls one, huayu runs it, shows the call and its result on stderr, gives the result back as a tool
message and lets the model go on, until it answers in text (MOSS's plugins; docs/tools.md).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Collection
from dataclasses import dataclass

from huayu.api import chat_decoding, decoding_args, model_chat_decoding
from huayu.config import add_config_arguments, config_from_args, field_doc, given_options
from huayu.data.chat import renders_tools, tool_templates
from huayu.data.chat_templates import TEMPLATE_HELP
from huayu.errors import HuayuError
from huayu.generation import EVA_BEAM, DecodingArgs, TemplateWarning
from huayu.models.loading import InferenceArgs
from huayu.plugins import run_call, select_plugins
from huayu.tools import ReplyStream, with_tools

MAX_TOOL_ROUNDS = 4  # calls in a row before a reply's calls are shown as text instead of run


@dataclass
class ChatConfig:
    model: str = field_doc("model directory (or a LoRA/prefix adapter directory whose base is known); default: huayu's "
                           "bundled chat model. Decoding options its generation_config.json sets replace the "
                           "defaults below",
                           positional=True, default=None)
    adapter: str | None = field_doc("LoRA or prefix adapter directory applied on top of MODEL", default=None)
    decoding: DecodingArgs = field_doc("decoding", default_factory=chat_decoding)
    beam: bool = field_doc("use EVA's beam-search preset (4 beams, length and repetition penalty 1.6)",
                           default=False)
    seed: int = field_doc("random seed for sampling", default=1234)
    max_source_length: int = field_doc("max tokens of dialogue history fed to the model", default=512)
    system: str | None = field_doc("system message every dialogue starts with", default=None)
    template: str | None = field_doc(TEMPLATE_HELP, default=None)
    tools: str | None = field_doc("tools the model may call, comma-separated: calculator, equation (docs/tools.md)",
                                  default=None)
    placement: InferenceArgs = field_doc("where the model runs", default_factory=InferenceArgs)


def set_seed(seed: int) -> None:
    """torch.manual_seed, with an error saying the range it accepts instead of its overflow traceback."""
    import torch

    if not -2**63 <= seed <= 2**64 - 1:
        raise HuayuError(f"seed {seed} is out of range: use an integer from -2**63 to 2**64-1")
    torch.manual_seed(seed)


def given_decoding(args) -> set[str]:
    """The decoding options the user set, by flag or in the --config file."""
    return {name.removeprefix("decoding.") for name in given_options(args) if name.startswith("decoding.")}


class ChatSession:
    """A dialogue in progress: the history and the commands that act on it."""

    def __init__(self, generator, cfg: ChatConfig, given: Collection[str] | None = None):
        """`given`: the options of cfg.decoding the user set (default: those differing from chat's defaults).
        Only they override the model's generation config and --beam; the rest are left to those."""
        self.generator, self.cfg = generator, cfg
        if given is None:
            given = {k for k, v in vars(chat_decoding()).items() if getattr(cfg.decoding, k) != v}
        options = {name: getattr(cfg.decoding, name) for name in given}
        self.decoding = decoding_args(model_chat_decoding(generator), {**(EVA_BEAM if cfg.beam else {}), **options})
        self.plugins = select_plugins(cfg.tools)
        self.tools = [p.schema() for p in self.plugins.values()]
        if self.plugins and not renders_tools(generator.tokenizer):
            raise HuayuError("--tools: the model's chat template does not render tools; chat with a model fine-tuned "
                             f"for tools with a template that does (--template {', '.join(tool_templates())})")
        set_seed(cfg.seed)
        self.clear()

    def clear(self) -> None:
        self.history = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []

    def command(self, line: str) -> str | None:
        """Handle a command word; return a status message, or None if `line` is not a command."""
        words = line.split()
        if words == ["clear"]:
            self.clear()
            return "(new dialogue)"
        if len(words) == 2 and words[0] == "seed" and words[1].removeprefix("-").isdecimal():
            try:
                set_seed(int(words[1]))
            except HuayuError as exc:
                return f"({exc})"
            return f"(seed {words[1]})"
        return None

    def reply(self, text: str):
        """Stream the reply to `text`, adding every turn to the history. A call is not shown as text:
        it is run, reported with its result (`report`), and the model goes on after the result."""
        self.history.append({"role": "user", "content": text})
        separator = ""  # text after a call starts on a line of its own
        for rounds in range(MAX_TOOL_ROUNDS + 1):
            prompt = self.generator.encode_chat(with_tools(self.history, self.tools), self.cfg.max_source_length)
            stream = ReplyStream(calls=bool(self.plugins) and rounds < MAX_TOOL_ROUNDS)
            for piece in self.generator.stream_ids(prompt, self.decoding):
                if piece := stream.feed(piece):
                    yield separator + piece
                    separator = ""
            rest, content, calls = stream.finish()
            if rest:
                yield separator + rest
            self.history.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
            for call in calls:
                result = run_call(call, self.plugins)
                self.report(f"[调用 {call['name']}] {json.dumps(call['arguments'], ensure_ascii=False)}")
                self.report(f"[结果] {result}")
                self.history.append({"role": "tool", "content": result})
            if not calls:
                return
            separator = "\n" if stream.sent else separator

    @staticmethod
    def report(line: str) -> None:
        """Where the calls and their results are shown: stderr, apart from the replies."""
        print(line, file=sys.stderr, flush=True)


def add_arguments(parser) -> None:
    add_config_arguments(parser, ChatConfig)


def run(args) -> int:
    from huayu.generation import Generator
    from huayu.models.loading import model_or_bundled

    cfg = config_from_args(ChatConfig, args)
    cfg.model = model_or_bundled(cfg.model)
    generator = Generator.load(cfg.model, adapter=cfg.adapter, template=cfg.template, placement=cfg.placement)
    session = ChatSession(generator, cfg, given_decoding(args))
    if generator.template_problem:
        print(f"huayu chat: warning: {generator.template_problem}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TemplateWarning)  # said once above, not again at the first reply
        converse(session, interactive=sys.stdin.isatty())
    return 0


def converse(session: ChatSession, interactive: bool) -> None:
    """Read lines until EOF, stop or exit; piped, stdout gets only the replies, one per line."""
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
            print(status, file=sys.stdout if interactive else sys.stderr)
            continue
        if interactive:
            print("模型 >>> ", end="", flush=True)
            for piece in session.reply(line):
                print(piece, end="", flush=True)
            print()
        else:
            print("".join(session.reply(line)).replace("\n", " ").strip(), flush=True)
