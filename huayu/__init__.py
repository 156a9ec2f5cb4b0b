"""huayu (华语): one toolkit for Chinese language models, from raw text to a chat model."""

__version__ = "0.1.0"
