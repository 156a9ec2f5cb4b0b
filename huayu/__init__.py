"""huayu (华语): one toolkit for Chinese language models, from raw text to a chat model."""

__version__ = "0.1.0"


def load(path: str, adapter: str | None = None, quantization: str | None = None, **kwargs):
    """A model ready to chat: `huayu.load("out/sft").chat("你好")`. See huayu.api.load."""
    from huayu.api import load as _load  # lazy: `import huayu` (and `huayu --help`) stays instant

    return _load(path, adapter=adapter, quantization=quantization, **kwargs)
