"""Load a model and its tokenizer from a bundled short name, a local directory or a hub id.

Pruned models with uneven per-layer shapes (``"shedder"`` in config.json) are rebuilt through
their family adapter; everything else goes through stock ``transformers``. Weights load from
safetensors only, and ``trust_remote_code`` stays off unless asked for.
"""
from __future__ import annotations

import functools
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .arch import adapter_class, instantiate, supported_architectures
from .errors import ModelLoadError, UnsupportedModelError

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS = REPO_ROOT / "assets" / "models"
DEFAULT_MODEL = "mamba2-tiny"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def bundled_models() -> list[str]:
    """Short names of the models shipped under assets/models."""
    if not BUNDLED_MODELS.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / "config.json").is_file())


def resolve(name_or_path: str) -> str:
    """A bundled name becomes its directory; a local path stays; anything else is taken as a hub id."""
    if (BUNDLED_MODELS / name_or_path / "config.json").is_file():
        return str(BUNDLED_MODELS / name_or_path)
    return str(name_or_path)


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16") from None


def check_device(device) -> str:
    """``device`` as a string, or ``ModelLoadError`` when this PyTorch build cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or mps") from None
    usable = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not usable.get(dev.type, False):
        raise ModelLoadError(f"device {device!r} is not available in this PyTorch build or on this machine; "
                             "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} does not exist (this machine has {torch.cuda.device_count()} GPU(s))")
    return str(device)


def check_weights(model_dir: Path) -> None:
    """Read the header of every safetensors file in ``model_dir`` (cheap: no tensor is loaded), so a
    truncated or garbage file is one clear error instead of a failure deep inside transformers."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path} is not a complete safetensors file (truncated or damaged: {e})") from None


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> bool:
    """True when the model hub cannot be reached (checked once per process, 3 s at most), so that
    hub ids resolve from the local cache at once instead of retrying the network for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return False
    except OSError:
        return True


def _offline(source: str) -> bool:
    return not Path(source).exists() and hub_unreachable()


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config, with clear errors for missing paths, no network and unknown architectures."""
    from transformers import AutoConfig

    source = resolve(name_or_path)
    local = Path(source)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} has no config.json; is it a model directory?")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model not found: {source} (no such directory; bundled models: {', '.join(bundled_models()) or 'none'})")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=_offline(source))
    except OSError as e:
        if local.exists():
            raise ModelLoadError(f"cannot read the config in {local}: {e}") from None
        raise ModelLoadError(f"cannot fetch {source!r} from the model hub (offline, or no such model?). "
                             f"Bundled models: {', '.join(bundled_models()) or 'none'}") from None
    except ValueError as e:  # e.g. a model_type transformers does not know
        raise UnsupportedModelError(f"{source}: {e}; supported architectures: {', '.join(supported_architectures())}") from None
    architecture = (getattr(config, "architectures", None) or [None])[0]
    adapter_class(architecture, getattr(config, "model_type", None))  # raises UnsupportedModelError
    return config


#: Files any of which makes a directory carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype="float32", device: str = "cpu",
               trust_remote_code: bool = False, tokenizer: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    The tokenizer comes from ``tokenizer`` (a name, directory or hub id) when given, else from the
    model's own source; a local directory without tokenizer files gives ``None`` (``info``,
    ``extract`` and ``bench`` need none; commands that read text say so, see ``require_tokenizer``)."""
    from transformers import AutoModelForCausalLM

    source = resolve(name_or_path)
    torch_dtype = parse_dtype(dtype)
    device = check_device(device)
    config = load_config(source, trust_remote_code)
    if Path(source).is_dir():
        check_weights(Path(source))
    try:
        if hasattr(config, "shedder"):
            model = _load_pruned(source, config, torch_dtype, device)
        else:
            if Path(source).is_dir():
                check_weight_shapes(Path(source), config)
            model = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=torch_dtype, use_safetensors=True,
                trust_remote_code=trust_remote_code, local_files_only=_offline(source)).to(device)
    except OSError as e:
        raise ModelLoadError(f"cannot load {source}: {e}") from None
    model.eval()
    return model, load_tokenizer(tokenizer or source, trust_remote_code, required=tokenizer is not None)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, required: bool = True):
    """The tokenizer of a bundled name, directory or hub id; ``None`` for a local directory that has
    no tokenizer files unless ``required`` (transformers would otherwise try, and fail, to convert a
    slow tokenizer for some families)."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        if required:
            raise ModelLoadError(f"{local} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return None
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=_offline(source))
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load a tokenizer from {source}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def require_tokenizer(tokenizer, model_name: str):
    """``tokenizer``, or the one-line error every command that reads text gives without one."""
    if tokenizer is None:
        raise ModelLoadError(f"{model_name} has no tokenizer files, and this command reads text: "
                             "pass --tokenizer NAME_OR_DIR (e.g. the checkpoint the model came from)")
    return tokenizer


def check_weight_shapes(local: Path, config):
    """Before anything is allocated: check config.json's ``shedder`` section (types, layer count,
    sizes within the config's; ``arch.spec``) and that every tensor the config builds has the
    shape ``model.safetensors`` holds (read from the file's header, no tensor loaded). Returns the
    adapter class. Raises ``ModelLoadError`` naming the file and the field or tensor at fault."""
    from safetensors import safe_open

    from .arch.spec import PrunedSpec
    from .extract import WEIGHTS_FILE

    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = adapter_class(architecture, config.model_type)
    PrunedSpec.of_config(config, cls.limits(config), where=str(local / "config.json"))
    weights = local / WEIGHTS_FILE
    if not weights.is_file():
        return cls
    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise ModelLoadError(f"{weights}: not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        skeleton = cls.build(config)
    for name, tensor in skeleton.state_dict().items():
        if name in shapes and shapes[name] != tuple(tensor.shape):
            section = "its shedder section" if hasattr(config, "shedder") else "no shedder section (deleted?)"
            raise ModelLoadError(f"{weights}: {name} has shape {list(shapes[name])}, but {local / 'config.json'} "
                                 f"(with {section}) describes {list(tensor.shape)}")
    return cls


def _load_pruned(source: str, config, dtype: torch.dtype, device: str):
    """Rebuild a pruned model with uneven shapes through its adapter and load its safetensors
    (written by ``shedder.extract.save`` under module names)."""
    from safetensors.torch import load_model as load_weights

    from .extract import WEIGHTS_FILE

    local = Path(source)
    if not local.is_dir():
        from huggingface_hub import snapshot_download
        local = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    weights = local / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{local} has no {WEIGHTS_FILE}")
    cls = check_weight_shapes(local, config)
    model = instantiate(cls, config, device=device, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # before loading: the file holds a tied tensor once
    try:
        load_weights(model, str(weights), strict=True, device=str(device))
    except RuntimeError as e:
        raise ModelLoadError(f"{local}: weights do not match the pruned structure in config.json ({e})") from None
    return model
