"""huayu (华语): one toolkit for Chinese language models, from raw text to a chat model."""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


def load(path: str, adapter: str | None = None, quantization: str | None = None, **kwargs):
    """A model ready to chat: `huayu.load("out/sft").chat("你好")`. See huayu.api.load."""
    from huayu.api import load as _load  # lazy: `import huayu` (and `huayu --help`) stays instant

    return _load(path, adapter=adapter, quantization=quantization, **kwargs)


def _register_models() -> None:
    """Register huayu's own architectures (GLM) with transformers' Auto classes."""
    import huayu.models.glm  # noqa: F401  (registers on import)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers huayu's models once `transformers` has been imported, so that `import huayu` stays
    instant and `AutoModelForCausalLM.from_pretrained` still knows huayu's model types."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_models()


if "transformers" in sys.modules:
    _register_models()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
