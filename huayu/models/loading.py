"""Load a tokenizer and model from a preset name or any local Hugging Face model directory.

Both paths end in a plain transformers model, so every stage treats a user's downloaded
checkpoint and a freshly initialised preset the same way. A peft adapter (LoRA or prefix) is
applied on top of such a model; a directory holding only an adapter names its base itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from huayu.config import field_doc
from huayu.errors import HuayuError
from huayu.models.families import family_of, family_of_model, family_of_preset, layer_count


ADAPTER_CONFIG = "adapter_config.json"
# huayu's own small Chinese chat model (recipes/bundled_chat.yaml; its model card is the README there):
# what `huayu chat` and `huayu serve` talk with when no model is given
BUNDLED_CHAT_MODEL = Path(__file__).parents[1] / "bundled" / "chat-small"


def model_or_bundled(model: str | None) -> str:
    """`model`, or the bundled chat model (saying so on stderr) when none is given."""
    if model:
        return model
    print(f"(no model given: huayu's bundled chat model, {BUNDLED_CHAT_MODEL}; see its README.md)", file=sys.stderr)
    return str(BUNDLED_CHAT_MODEL)


# Pickled weights can run code on loading; they are read only when the user says they trust them.
ALLOW_PICKLE_ENV = "HUAYU_ALLOW_PICKLE_WEIGHTS"
ALLOW_PICKLE_FLAG = "--allow-pickle-weights"


def pickle_weights_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "") not in ("", "0", "false")


def check_safe_weights(directory: str | Path, adapter: bool = False) -> None:
    """Refuse a model (or adapter) directory whose weights exist only as pickles (pytorch_model.bin,
    adapter_model.bin, ...): unpickling a planted file runs its code. The user may allow them."""
    directory = Path(directory)
    stem = "adapter_model" if adapter else "model"
    if list(directory.glob(f"{stem}*.safetensors")) or pickle_weights_allowed():
        return
    pickles = sorted(p.name for p in directory.glob("*.bin") if p.name.startswith(
        "adapter_model" if adapter else "pytorch_model"))
    if pickles:
        raise HuayuError(f"'{directory}' holds its weights only as a pickle ({', '.join(pickles)}), and loading a "
                         f"pickle can run code planted in it: use a safetensors copy of the model, or pass "
                         f"{ALLOW_PICKLE_FLAG} (or set {ALLOW_PICKLE_ENV}=1) if you trust these files")


# A checkpoint's own Python code (`auto_map` in its config.json or tokenizer_config.json) runs only when the
# user says they trust it.
TRUST_REMOTE_CODE_ENV = "HUAYU_TRUST_REMOTE_CODE"
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"


def remote_code_trusted() -> bool:
    """What every transformers Auto call gets as `trust_remote_code`: never None, which would make
    transformers ask on stdin (taking the first line a user pipes into `huayu chat`)."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "") not in ("", "0", "false")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _code_modules(auto_map) -> list[str]:
    """The files of the classes an `auto_map` names ("repo--module.Class" or "module.Class"; a
    tokenizer's entry is a [slow, fast] pair)."""
    entries = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    refs = [r for e in entries for r in (e if isinstance(e, (list, tuple)) else [e]) if r]
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs})


def check_remote_code(directory: str | Path) -> None:
    """Refuse, before transformers is asked, a checkpoint that loads only by running its own code:
    a model type transformers does not ship, built by the modules its config.json's `auto_map`
    names, or a tokenizer class likewise, unless the user trusts it; a model type nothing can build
    either way. A checkpoint that ships code for a model transformers knows loads with
    transformers' own classes, running none of it."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    directory = Path(directory)
    config = _read_json(directory / "config.json")
    model_type = config.get("model_type")
    known = not model_type or model_type in CONFIG_MAPPING
    modules = _code_modules(config.get("auto_map", {}))
    if not known and not modules:
        import transformers

        raise HuayuError(f"'{directory}' has model type '{model_type}', which transformers {transformers.__version__} "
                         "does not know, and no code of its own (auto_map in config.json) to build it")
    if remote_code_trusted():
        return
    if not known:
        _refuse_code(directory, f"model type '{model_type}'", modules)
    tokenizer = _read_json(directory / "tokenizer_config.json")
    auto_map = tokenizer.get("auto_map", {})
    code = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    declared = tokenizer.get("tokenizer_class")
    if code and not (declared and (tokenizer_class_from_name(declared)
                                   or tokenizer_class_from_name(declared.removesuffix("Fast")))):
        _refuse_code(directory, f"tokenizer {declared or ''}".rstrip(), _code_modules(code))


def _refuse_code(directory: Path, what: str, modules: list[str]) -> None:
    raise HuayuError(f"'{directory}' needs its own Python code to load ({what}: {', '.join(modules)}), which "
                     f"huayu runs only when told to: pass {TRUST_REMOTE_CODE_FLAG} (or set "
                     f"{TRUST_REMOTE_CODE_ENV}=1) if you trust that code")


def load_config(directory: str | Path):
    """The transformers config of a model directory; one needing code of its own only if trusted."""
    from transformers import AutoConfig

    check_remote_code(directory)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=remote_code_trusted())
    except (OSError, ValueError) as exc:
        raise HuayuError(f"cannot read the model config of '{directory}': {exc}") from None


DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass
class LoadingArgs:
    """How a model is loaded for training: the memory levers of a large model on one card."""
    torch_dtype: str = field_doc(f"dtype to load the weights in: {' | '.join(DTYPES)} (auto: as stored)",
                                 default="auto")
    attn_implementation: str | None = field_doc(f"attention kernels: {' | '.join(ATTENTION)} (default: the "
                                                "model's own choice)", default=None)
    quantization_bit: int | None = field_doc("load the weights in 4 bits (NF4, double quantization) or 8 bits "
                                             "through bitsandbytes, CUDA only (training: QLoRA, with "
                                             "--finetuning-type lora)", default=None)

    def check(self) -> None:
        if self.torch_dtype not in DTYPES:
            raise HuayuError(f"--torch-dtype must be one of {', '.join(DTYPES)}, got '{self.torch_dtype}'")
        if self.attn_implementation not in (None, *ATTENTION):
            raise HuayuError(f"--attn-implementation must be one of {', '.join(ATTENTION)}, "
                             f"got '{self.attn_implementation}'")
        if self.quantization_bit is not None:
            quantization_config(self.quantization_bit)

    def kwargs(self) -> dict:
        """from_pretrained's keyword arguments for these choices (none: transformers' defaults)."""
        import torch

        kwargs = {} if self.torch_dtype == "auto" else {"dtype": getattr(torch, self.torch_dtype)}
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.quantization_bit is not None:
            from accelerate import PartialState

            # bitsandbytes places the weights as it quantizes them: on this process's GPU
            kwargs.update(quantization_config=quantization_config(self.quantization_bit),
                          device_map={"": PartialState().local_process_index})
        return kwargs


@dataclass
class InferenceArgs(LoadingArgs):
    """Where a model generates (chat, eval, generate, serve, webui, huayu.load): --device, and the
    loading levers. On CUDA, --quantization-bit loads through bitsandbytes; huayu's own
    --quantization int8/int4 is the CPU's path."""
    device: str = field_doc("auto | cpu | cuda (auto: a CUDA GPU when there is one)", default="auto")


def quantization_config(bits: int):
    """bitsandbytes' config for QLoRA: NF4 with double quantization and bf16 compute, or LLM.int8;
    a clear error where it cannot run (no CUDA GPU, bitsandbytes not installed)."""
    import importlib.util

    import torch

    if bits not in (4, 8):
        raise HuayuError(f"--quantization-bit must be 4 or 8, got {bits}")
    if not torch.cuda.is_available():
        raise HuayuError("--quantization-bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4- and 8-bit layers train only "
                         "there; on this machine fine-tune with --finetuning-type lora at full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HuayuError("--quantization-bit needs bitsandbytes: pip install -e '.[gpu]' (README, GPUs)")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _is_model_dir(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "config.json").exists()


def is_quantized_dir(path) -> bool:
    """A model directory written by `huayu quantize` (its config carries the quantization record)."""
    from huayu.quantization import RECORD

    return RECORD in json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def is_adapter_dir(path) -> bool:
    """A peft adapter directory (adapter_config.json) that is not also a full model."""
    return (Path(path) / ADAPTER_CONFIG).exists() and not _is_model_dir(str(path))


def adapter_config(adapter: str) -> dict:
    if not (Path(adapter) / ADAPTER_CONFIG).exists():
        raise HuayuError(f"'{adapter}' is not an adapter directory (it has no {ADAPTER_CONFIG})")
    return json.loads((Path(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def resolve_adapter(spec: str, adapter: str | None = None) -> tuple[str, str | None]:
    """(base model, adapter) for MODEL [--adapter]. MODEL may itself be an adapter directory: its
    base is then the one recorded in its adapter_config.json, if that exists here."""
    if adapter is None and is_adapter_dir(spec):
        spec, adapter = adapter_config(spec).get("base_model_name_or_path") or "", spec
        if not _is_model_dir(spec):
            raise HuayuError(f"'{adapter}' is an adapter trained on '{spec}', which is not a model directory "
                             f"here: pass the base model and the adapter: MODEL --adapter {adapter}")
    if adapter is not None and not _is_model_dir(spec):
        raise HuayuError(f"an adapter needs its base model directory, not '{spec}'")
    return spec, adapter


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer given explicitly, else the one saved with the model. Without a pad token it
    pads with eos (padded positions carry no loss and are masked from attention)."""
    source = tokenizer or model
    if not Path(source).is_dir():
        if family_of_preset(model) is not None and tokenizer is None:
            raise HuayuError(f"'{model}' is a preset: pass --tokenizer DIR (train one with "
                             "`huayu tokenizer train`)")
        raise HuayuError(f"tokenizer '{source}' is not a directory")
    check_remote_code(source)
    try:
        tok = _saved_tokenizer(source)
    except (OSError, ValueError) as exc:
        raise HuayuError(f"cannot load a tokenizer from '{source}': {exc}") from None
    if tok.eos_token is None and tok.sep_token is not None:  # BERT-vocab Chinese GPT-2 checkpoints
        tok.eos_token = tok.sep_token
    if tok.pad_token is None:  # e.g. GPT-2: pad with eos; padded positions never carry loss
        tok.pad_token = tok.eos_token
    if _is_model_dir(model) or family_of_preset(model) is not None:
        family_of_model(model).add_special_tokens(tok)  # e.g. GLM's [gMASK], <sop>, ... for a new GLM
    return tok


# the class transformers saves a plain `tokenizers` pipeline (tokenizer.json) under, by version
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer(source: str):
    """The tokenizer saved in `source` as it was saved. AutoTokenizer replaces a plain tokenizer.json
    pipeline with the class it registers for some model types (a `qwen2` config gets Qwen2's byte-level
    BPE, rebuilt from the vocabulary, which drops every Chinese character of a char-level one); a
    plain pipeline is therefore loaded as one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    declared = _read_json(Path(source, "tokenizer_config.json")).get("tokenizer_class")
    if declared in PLAIN_TOKENIZER_CLASSES and Path(source, "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=remote_code_trusted())


def load_model(spec: str, tokenizer, dtype=None, seed: int = 0, adapter: str | None = None,
               trainable_adapter: bool = False, classes: list[str] | None = None, loading: LoadingArgs | None = None,
               prepare_base=None):
    """A model from a local HF directory, or a freshly initialised preset sized to `tokenizer`;
    with `adapter` (or when `spec` is an adapter directory) a peft model of base + adapter, whose
    adapter is `trainable_adapter` to resume its training. With `classes`, a sequence classifier
    over them: a pre-trained encoder keeps its body and gets a new classification head. `loading`:
    training's dtype, attention and quantization choices; `prepare_base(model)`, what training does
    to the base before an adapter goes on (gradient checkpointing, k-bit preparation)."""
    spec, adapter = resolve_adapter(spec, adapter)
    prepare_base = prepare_base or (lambda base: base)
    if adapter is None:
        return prepare_base(_load_base(spec, tokenizer, dtype, seed, classes, loading))
    if _is_model_dir(spec) and is_quantized_dir(spec):
        raise HuayuError(f"'{spec}' is quantized: merge the adapter into the full-precision base first "
                         f"(huayu export merge), then quantize the merged model")
    mismatch = _check_adapter_base(spec, adapter)  # first: a wrong base's vocabulary would fail less clearly
    return _attach_adapter(prepare_base(_load_base(spec, tokenizer, dtype, seed, classes, loading)), adapter,
                           mismatch, trainable_adapter)


def is_classifier(config) -> bool:
    """Whether a saved config is a sequence classifier's (e.g. huayu finetune-cls's output)."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def _classifier_kwargs(classes: list[str] | None) -> dict:
    if classes is None:
        return {}
    return {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
            "label2id": {c: i for i, c in enumerate(classes)}}


def _load_base(spec: str, tokenizer, dtype, seed: int, classes: list[str] | None = None,
               loading: LoadingArgs | None = None):
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars for tiny models are noise in huayu's output
    options = loading.kwargs() if loading is not None else {}
    if _is_model_dir(spec):
        from huayu.quantization import is_quantized, load_quantized

        config = load_config(spec)
        classifier = classes is not None or is_classifier(config)
        auto = transformers.AutoModelForSequenceClassification if classifier else family_of(config).auto()
        if is_quantized(config):
            if classes is not None:
                raise HuayuError(f"'{spec}' is quantized, for inference only: build the classifier from the "
                                 "full-precision model")
            return load_quantized(spec, config, auto, dtype)
        check_safe_weights(spec)
        torch.manual_seed(seed)  # a new classification head is initialised reproducibly
        with _quiet_new_head(classes is not None):
            # by absolute path, so that an adapter trained on this model records where its base is
            model = auto.from_pretrained(str(Path(spec).resolve()), **{"dtype": dtype, **options},
                                         **_classifier_kwargs(classes), trust_remote_code=remote_code_trusted(),
                                         use_safetensors=None if pickle_weights_allowed() else True)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise HuayuError(f"tokenizer has {len(tokenizer)} tokens but the model at '{spec}' "
                             f"has only {model.get_input_embeddings().num_embeddings} embeddings")
        return model
    family = family_of_model(spec)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, **family.special_ids(tokenizer))
    config = family.build_config(spec, len(tokenizer), special)
    for key, value in _classifier_kwargs(classes).items():
        setattr(config, key, value)
    if options.get("quantization_config") is not None:
        raise HuayuError(f"--quantization-bit quantizes a trained base model: '{spec}' is a preset, initialised at "
                         "random")
    torch.manual_seed(seed)
    auto = transformers.AutoModelForSequenceClassification if classes else family.auto()
    model = auto.from_config(config, **{k: v for k, v in options.items() if k == "attn_implementation"})
    dtype = options.get("dtype", dtype)
    return model.to(dtype) if dtype is not None else model


@contextlib.contextmanager
def _quiet_new_head(new_head: bool):
    """transformers reports a classification head missing from a pre-trained checkpoint, and the
    pre-training heads it leaves unused, as a problem; for a classifier being built it is the plan."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if new_head:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_for_inference(spec: str, adapter: str | None = None, dtype=None, placement: InferenceArgs | None = None):
    """(tokenizer, model) of MODEL [--adapter], on `placement`'s device (default: the CPU). An
    adapter's own tokenizer, which training saves beside it with the chat template it was trained
    with, wins over the base's."""
    from huayu.train.distributed import resolve_device, tell_deepspeed

    placement = placement or InferenceArgs(device="cpu")
    placement.check()
    device = resolve_device(placement.device)
    tell_deepspeed(device)
    spec, adapter = resolve_adapter(spec, adapter)
    has_own = adapter is not None and (Path(adapter) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(adapter if has_own else spec)
    model = load_model(spec, tokenizer, dtype=dtype, adapter=adapter, loading=placement)
    if placement.quantization_bit is None:  # bitsandbytes placed its weights as it loaded them
        model.to(device)
    return tokenizer, model


QUANTIZATIONS = {"int8": 8, "int4": 4}


def quantize_for_inference(model, quantization: str | None):
    """`model` with its Linear layers quantized on loading (weight-only int8, or int4 in groups of
    32: huayu.quantization), as `huayu quantize` would save it. None: unchanged."""
    if quantization is None:
        return model
    if quantization not in QUANTIZATIONS:
        raise HuayuError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), got {quantization!r}")
    if next(model.parameters()).device.type != "cpu":
        raise HuayuError(f"--quantization {quantization} is huayu's CPU kernel: on a GPU load the weights in 8 or 4 "
                         "bits with --quantization-bit 8|4 (bitsandbytes)")
    from huayu.quantization import quantize_model

    quantize_model(model, QUANTIZATIONS[quantization])
    return model


@contextlib.contextmanager
def peft_quietly():
    """Silence the FutureWarning peft triggers on every wrap (its use of transformers'
    deprecated `is_gradient_checkpointing`): it is not the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def _describe(config) -> str:
    vocab = getattr(config, "vocab_size", None) or getattr(config, "padded_vocab_size", None)  # ChatGLM's name
    return f"{config.model_type}, {layer_count(config)} layers, hidden size {config.hidden_size}, vocab {vocab}"


def _check_adapter_base(spec: str, adapter: str) -> str:
    """Fail if the adapter's recorded base, when it exists here, differs from MODEL in shape or
    architecture; else return the message that explains peft's errors if the base is still wrong."""
    base = adapter_config(adapter).get("base_model_name_or_path")
    trained_on = _describe(load_config(base)) if base and _is_model_dir(base) else None
    given = _describe(load_config(spec))
    mismatch = (f"adapter '{adapter}' was trained on base '{base}' ({trained_on or 'not available here'}) "
                f"but MODEL '{spec}' is {given}")
    if trained_on is not None and trained_on != given:
        raise HuayuError(f"{mismatch}: pass the base model the adapter was trained on")
    return mismatch


def _attach_adapter(model, adapter: str, mismatch: str, trainable: bool):
    """`model` with the peft adapter at `adapter`; peft's shape or module errors explained."""
    from peft import PeftModel

    check_safe_weights(adapter, adapter=True)
    try:
        with peft_quietly():
            return _trainable_adapter(model, adapter) if trainable else PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise HuayuError(f"{mismatch}; peft: {' '.join(str(exc).split())[:300]}") from None


def _trainable_adapter(model, adapter: str):
    """The adapter rebuilt from its config as training built it, with its saved weights: peft's
    from_pretrained(is_trainable=True) refuses prompt-learning (prefix) adapters."""
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(adapter)
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    set_peft_model_state_dict(peft_model, load_peft_weights(adapter))
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
