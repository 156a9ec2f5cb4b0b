"""`huayu webui`: chat with a model in the browser, for people who would rather not use a terminal.

A Gradio page on top of `huayu.api`: every turn the model gets the whole dialogue shown, the reply
streams in as it is generated, and sliders set the decoding (or a box switches to EVA's beam
search). The page talks to nothing but the browser that opened it: no share link, no analytics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from huayu.api import chat_decoding
from huayu.config import add_config_arguments, config_from_args, field_doc, given_options
from huayu.data.chat_templates import TEMPLATE_HELP
from huayu.generation import EVA_BEAM
from huayu.models.loading import InferenceArgs

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at launch: no telemetry, no version check

TITLE = "华语 huayu chat"
_START = chat_decoding()  # the sliders start where `huayu chat` decodes (then the model's own config)
SLIDERS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty")


@dataclass
class WebUIConfig:
    model: str = field_doc("model directory (or a LoRA/prefix adapter directory whose base is known); default: "
                           "huayu's bundled chat model", positional=True, default=None)
    adapter: str | None = field_doc("LoRA or prefix adapter directory applied on top of MODEL", default=None)
    quantization: str | None = field_doc('"int8" or "int4" to quantize the weights on loading', default=None)
    host: str = field_doc("address to listen on (0.0.0.0: every interface)", default="127.0.0.1")
    port: int = field_doc("port to listen on", default=7860)
    system: str | None = field_doc("optional system message", default=None)
    template: str | None = field_doc(TEMPLATE_HELP, default=None)
    placement: InferenceArgs = field_doc("where the model runs", default_factory=InferenceArgs)
    seed: int = field_doc("random seed for sampling", default=1234)
    beam: bool = field_doc("start with EVA's beam-search preset ticked", default=False)
    temperature: float = field_doc("starting temperature (a slider not set here starts where the model's "
                                   "generation_config.json puts it)", default=_START.temperature)
    top_p: float = field_doc("starting top-p", default=_START.top_p)
    top_k: int = field_doc("starting top-k (0: off)", default=_START.top_k)
    max_new_tokens: int = field_doc("starting max new tokens", default=_START.max_new_tokens)
    repetition_penalty: float = field_doc("starting repetition penalty", default=_START.repetition_penalty)


def start_sliders(cfg: WebUIConfig, given: set[str], model_decoding) -> None:
    """Start each slider the user did not set where `huayu chat` would decode this model
    (`model_decoding`: chat's defaults under the model's generation_config.json)."""
    for name in set(SLIDERS) - given:
        setattr(cfg, name, getattr(model_decoding, name))


def decoding_options(beam: bool, **sliders) -> dict:
    """Decoding kwargs for `stream_chat`: EVA's beam preset, or sampling as the sliders say."""
    if beam:
        return {**EVA_BEAM, "max_new_tokens": sliders["max_new_tokens"]}
    return {"do_sample": True, "num_beams": 1, **sliders}


def _plain(messages) -> list[dict]:
    """Chatbot messages as huayu messages; Gradio hands content over as a list of parts."""
    def text(content) -> str:
        return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)

    return [{"role": m["role"], "content": text(m["content"])} for m in messages]


def stream_reply(chat_model, message: str, messages, system: str | None = None,
                 **decoding) -> Iterator[list[dict]]:
    """The chatbot's messages plus `message` and the reply to it, yielded as the reply grows."""
    history = _plain(messages)
    if not message.strip():
        yield history
        return
    shown = history + [{"role": "user", "content": message}]
    yield shown
    for reply, _ in chat_model.stream_chat(message, history, system=system, **decoding):
        yield shown + [{"role": "assistant", "content": reply}]


def _sliders(cfg: WebUIConfig, max_tokens: int) -> dict:
    """One slider per decoding option, keyed by the option's name."""
    import gradio as gr

    spec = {  # name: (label, minimum, maximum, step); an int step makes an int slider
        "temperature": ("temperature 温度", 0.05, 2.0, 0.05),
        "top_p": ("top-p", 0.05, 1.0, 0.05),
        "top_k": ("top-k (0: off)", 0, 100, 1),
        "max_new_tokens": ("max new tokens 最大生成长度", 1, max(max_tokens, cfg.max_new_tokens), 1),
        "repetition_penalty": ("repetition penalty 重复惩罚", 1.0, 2.0, 0.05),
    }
    return {name: gr.Slider(low, high, value=getattr(cfg, name), step=step, label=label,
                            precision=0 if isinstance(step, int) else None, elem_id=name.replace("_", "-"))
            for name, (label, low, high, step) in spec.items()}


def build_demo(chat_model, cfg: WebUIConfig):
    """The chat page for `chat_model` (a `huayu.api.ChatModel`), as a `gradio.Blocks` to launch."""
    import gradio as gr

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n模型 model: `{chat_model.path}`")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="对话 dialogue", elem_id="chatbot", height=480)
                with gr.Row():
                    msg = gr.Textbox(placeholder="输入消息，回车发送 (Enter to send)", show_label=False,
                                     elem_id="msg", scale=5, autofocus=True)
                    send = gr.Button("发送 Send", variant="primary", elem_id="send", scale=1)
                clear = gr.Button("清空 Clear", elem_id="clear")
            with gr.Column(scale=1):
                beam = gr.Checkbox(value=cfg.beam, label="beam search 束搜索 (EVA preset, no sampling)",
                                   elem_id="beam")
                sliders = _sliders(cfg, chat_model.generator.max_positions // 2)

        def respond(message, messages, beam_on, *values):
            decoding = decoding_options(beam_on, **dict(zip(sliders, values)))
            for shown in stream_reply(chat_model, message, messages, cfg.system, **decoding):
                yield "", shown

        chat = gr.on([msg.submit, send.click], respond, inputs=[msg, chatbot, beam, *sliders.values()],
                     outputs=[msg, chatbot])
        clear.click(lambda: ([], ""), outputs=[chatbot, msg], cancels=[chat], queue=False)
    return demo


def add_arguments(parser) -> None:
    add_config_arguments(parser, WebUIConfig)


def run(args) -> int:
    import torch

    from huayu.api import load
    from huayu.models.loading import model_or_bundled

    cfg = config_from_args(WebUIConfig, args)
    cfg.model = model_or_bundled(cfg.model)
    chat_model = load(cfg.model, adapter=cfg.adapter, quantization=cfg.quantization, template=cfg.template,
                      dtype=cfg.placement.torch_dtype, device=cfg.placement.device,
                      quantization_bit=cfg.placement.quantization_bit,
                      attn_implementation=cfg.placement.attn_implementation)
    start_sliders(cfg, given_options(args), chat_model.decoding)
    torch.manual_seed(cfg.seed)
    demo = build_demo(chat_model, cfg)
    _, url, _ = demo.queue().launch(server_name=cfg.host, server_port=cfg.port, share=False, quiet=True,
                                    show_error=True, prevent_thread_lock=True)
    print(f"{TITLE}: {url}  (Ctrl+C to stop)", flush=True)
    demo.block_thread()
    return 0
