"""Model families: the one place that knows how architectures differ.

A family says which Auto class loads it and whether it generates. Code elsewhere asks
`family_of(config)` instead of testing `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from huayu.errors import HuayuError
from huayu.models.presets import DECODER_PRESETS, Preset


@dataclass(frozen=True)
class Family:
    name: str
    auto_class: str                 # attribute of `transformers`
    can_generate: bool
    presets: dict[str, Preset] = field(default_factory=dict)

    def auto(self):
        import transformers
        return getattr(transformers, self.auto_class)


DECODER = Family("decoder", "AutoModelForCausalLM", True, DECODER_PRESETS)
FAMILIES = {f.name: f for f in (DECODER,)}


def family_of(config) -> Family:
    """The family of a loaded transformers config."""
    if getattr(config, "is_encoder_decoder", False):
        raise HuayuError(f"model type '{config.model_type}' is encoder-decoder, which this version "
                         "of huayu does not support yet")
    return DECODER


def family_of_preset(name: str) -> Family | None:
    for fam in FAMILIES.values():
        if name in fam.presets:
            return fam
    return None


def all_presets() -> list[str]:
    return [name for fam in FAMILIES.values() for name in fam.presets]
