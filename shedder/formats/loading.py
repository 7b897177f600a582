"""Load a model and its tokenizer from a bundled short name, a local directory or a hub id.

Pruned models with uneven per-layer shapes (``"shedder"`` in config.json) are rebuilt through
their family adapter; everything else goes through stock ``transformers``. Weights load from
safetensors only, and ``trust_remote_code`` stays off unless asked for.

Before anything is built, every load checks what it reads (a hub model's downloaded snapshot
too): each file is a regular file (a FIFO would block forever), config.json is a JSON object of
well-typed values whose sizes lie within ``arch.spec``'s bounds, and the safetensors headers hold
exactly the tensors the config builds (names, shapes, floating-point dtypes). After loading, every
parameter is finite. A model that does not match its config is one ``ModelLoadError``, never
randomly initialised layers or a nan perplexity.
"""
from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_weights

from shedder.arch import adapter_class, instantiate, supported_architectures
from shedder.arch.spec import PrunedSpec, check_config_sizes
from shedder.core.defaults import DEFAULT_MODEL
from shedder.core.errors import ModelLoadError, UnsupportedModelError
from shedder.core.hub import hub_unreachable
from shedder.formats.extract import WEIGHTS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODELS = REPO_ROOT / "assets" / "models"

#: Files any of which makes a directory carry its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
#: The weight map of a sharded checkpoint (tensor name -> shard file).
INDEX_FILE = WEIGHTS_FILE + ".index.json"
#: Files of a model directory that loading (or transformers) reads; each must be a regular file,
#: as must every ``*.safetensors``.
READ_FILES = ("config.json", "generation_config.json", INDEX_FILE, "special_tokens_map.json", "added_tokens.json",
              "merges.txt", *TOKENIZER_FILES)
#: What the safetensors header of a weight may say: the model computes in floating point.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
#: A config.json or weight index larger than this is not one (real ones: a few kB to a few MB).
MAX_JSON_BYTES = 64 << 20

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


def check_regular_files(local: Path) -> None:
    """Refuse a config, weight or tokenizer file in ``local`` that is not a regular file (a FIFO
    or device would block the read forever, a directory fails deep inside transformers), without
    opening it. ``stat`` follows links: a link to a regular file, as in the hub cache, is fine."""
    for path in sorted(local.iterdir()):
        if path.name not in READ_FILES and not path.name.endswith(".safetensors"):
            continue
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise ModelLoadError(f"{path} cannot be read ({e.strerror}; a broken link?)") from None
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
            raise ModelLoadError(f"{path} is {kind}, not a regular file; refusing to read it")


def read_json_object(path: Path) -> dict:
    """``path`` parsed as one JSON object, or one ``ModelLoadError`` naming it (not UTF-8, not
    JSON, nested too deeply for the parser, too large, or not an object)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path} is over {MAX_JSON_BYTES >> 20} MiB, too large for a model's config or weight index")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ModelLoadError(f"{path} is nested too deeply to be read") from None
    except ValueError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _offline(source: str) -> bool:
    return not Path(source).exists() and hub_unreachable()


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config, with clear errors for missing paths, no network and unknown architectures."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoConfig

    source = resolve(name_or_path)
    local = Path(source)
    where = local / "config.json"
    raw = {}
    if local.exists():
        if local.is_dir():
            check_regular_files(local)
        if not where.is_file():
            raise ModelLoadError(f"{local} has no config.json; is it a model directory?")
        raw = read_json_object(where)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model not found: {source} (no such directory; bundled models: {', '.join(bundled_models()) or 'none'})")
    else:
        where = f"config.json of {source}"
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=_offline(source))
    except OSError as e:
        if local.exists():
            raise ModelLoadError(f"cannot read the config in {local}: {e}") from None
        raise ModelLoadError(f"cannot fetch {source!r} from the model hub (offline, or no such model?). "
                             f"Bundled models: {', '.join(bundled_models()) or 'none'}") from None
    except StrictDataclassError as e:  # transformers 5 config classes validate their fields' types
        raise ModelLoadError(f"{where}: {_one_line(e)}") from None
    except ValueError as e:
        if raw.get("model_type") in CONFIG_MAPPING:  # a known family refusing one of its values
            raise ModelLoadError(f"{where}: {_one_line(e)}") from None
        raise UnsupportedModelError(f"{source}: {e}; supported architectures: {', '.join(supported_architectures())}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # a config class computing with a wrong-typed value
        raise ModelLoadError(f"{where}: a value has the wrong type ({type(e).__name__}: {_one_line(e)})") from None
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = adapter_class(architecture, getattr(config, "model_type", None))  # raises UnsupportedModelError
    check_config_sizes(config, cls.size_fields, str(where))
    return config


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
    local = Path(source) if Path(source).is_dir() else _snapshot(source)
    cls = check_weights(local, config)
    try:
        if hasattr(config, "shedder"):
            model = _load_pruned(local, cls, config, torch_dtype, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(local), config=config, dtype=torch_dtype, use_safetensors=True,
                trust_remote_code=trust_remote_code, local_files_only=True).to(device)
    except OSError as e:
        raise ModelLoadError(f"cannot load {source}: {e}") from None
    check_finite(model, local, torch_dtype)
    model.eval()
    return model, load_tokenizer(tokenizer or source, trust_remote_code, required=tokenizer is not None)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, required: bool = True):
    """The tokenizer of a bundled name, directory or hub id; ``None`` for a local directory that has
    no tokenizer files unless ``required`` (transformers would otherwise try, and fail, to convert a
    slow tokenizer for some families)."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    local = Path(source)
    if local.is_dir():
        check_regular_files(local)
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


def _snapshot(source: str) -> Path:
    """The local snapshot of hub model ``source`` (downloaded, or from the cache when offline), so
    that its files get the same checks as a local directory's before anything is built."""
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py"],
                                       local_files_only=_offline(source)))
    except (OSError, ValueError) as e:  # the hub's errors: offline, gated, not cached, no such repo
        raise ModelLoadError(f"cannot fetch the weights of {source!r} from the model hub ({_one_line(e)})") from None
    check_regular_files(local)
    return local


def weight_files(local: Path) -> list[Path]:
    """The safetensors files a model loads from: the shards ``model.safetensors.index.json``
    names, else ``model.safetensors`` (other ``*.safetensors`` files are not the model's)."""
    index = local / INDEX_FILE
    if not index.is_file():
        if not (local / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{local} has no {WEIGHTS_FILE} (nor {INDEX_FILE})")
        return [local / WEIGHTS_FILE]
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index}: weight_map must map tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if Path(name).name != name or not (local / name).is_file():
            raise ModelLoadError(f"{index} names shard {name!r}, which is not a file in {local}")
    return [local / name for name in shards]


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """Tensor name -> (shape, header dtype such as ``"F32"``, file) over all ``files``, read from
    their headers only (cheap: no tensor is loaded), so a truncated or garbage file is one clear
    error instead of a failure deep inside transformers."""
    tensors = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    if name in tensors:
                        raise ModelLoadError(f"{name} is in both {tensors[name][2]} and {path}")
                    tensors[name] = (tuple(part.get_shape()), part.get_dtype(), path)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path} is not a complete safetensors file (truncated or damaged: {e})") from None
    return tensors


def check_weights(local: Path, config):
    """Before anything is allocated: check config.json's ``shedder`` section (types, layer count,
    sizes within the config's; ``arch.spec``), then that the safetensors headers hold exactly the
    tensors the config builds (``load_config`` bounded its sizes, so the meta-device skeleton
    this compares against is cheap), in the right shapes, in floating point. Returns the adapter
    class. Raises one ``ModelLoadError`` naming the file and the field or tensors at fault."""
    where = local / "config.json"
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = adapter_class(architecture, config.model_type)
    PrunedSpec.of_config(config, cls.limits(config), where=str(where))
    tensors = read_headers(weight_files(local))
    with torch.device("meta"):
        skeleton = cls.build(config)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()  # a tied tensor is stored once, under either name
    expected = skeleton.state_dict(keep_vars=True)
    renamed = _renamed(skeleton, tensors)
    for stored, (name, converted) in renamed.items():  # shapes first: the most specific message
        if name not in expected:
            continue
        shape, dtype, path = tensors[stored]
        tensor = expected[name]
        if not converted and shape != tuple(tensor.shape):
            section = "its shedder section" if hasattr(config, "shedder") else "no shedder section (deleted?)"
            raise ModelLoadError(f"{path}: {name} has shape {list(shape)}, but {where} "
                                 f"(with {section}) describes {list(tensor.shape)}")
        if tensor.is_floating_point() and dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"{path}: {stored} is stored as {dtype}; weights must be floating point "
                                 f"({', '.join(FLOAT_DTYPES)})")
    _check_names(cls, expected, renamed, where)
    return cls


def _renamed(skeleton, tensors: dict) -> dict[str, tuple[str, bool]]:
    """Stored tensor name -> (the model's name for it, whether transformers converts it on loading,
    e.g. merging per-expert tensors, so its stored shape is not the model's), by transformers' own
    conversion mapping (Nemotron-H checkpoints say ``backbone.`` where the model has ``model.``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = skeleton.state_dict()
    out = {}
    for stored in tensors:
        name, converter = rename_source_key(stored, renamings, converters, skeleton.base_model_prefix, meta)
        out[stored] = (name, converter is not None)
    return out


def _check_names(cls, expected: dict[str, torch.Tensor], renamed: dict[str, tuple[str, bool]], where: Path) -> None:
    """Every tensor the config builds is in the files (a tied one under any of its names) and the
    files hold nothing else: otherwise transformers would randomly initialise what is missing and
    drop what is extra, and every number computed after would be silently wrong."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        names_of.setdefault(id(tensor), []).append(name)
    stored = {name for name, _ in renamed.values()}
    missing = [names[0] for names in names_of.values() if not any(n in stored for n in names)]
    unexpected = [original for original, (name, _) in renamed.items() if name not in expected]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the config builds are missing ({_first(missing)})"
                     + _missing_layers(cls, missing, stored))
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the weights are not in the model the config builds "
                     f"({_first(unexpected)})")
    raise ModelLoadError(f"the weights in {where.parent} do not match {where}: {'; '.join(parts)}")


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... and {len(names) - n} more" if len(names) > n else "")


def _missing_layers(cls, missing: list[str], stored: set[str]) -> str:
    """Which whole layers the weights lack (a config whose layer count is wrong, or defaulted)."""
    index = re.compile(re.escape(cls.layers_path) + r"\.(\d+)\.")

    def layers(names):
        return {int(m.group(1)) for m in map(index.match, names) if m}

    absent = sorted(layers(missing) - layers(stored))
    if not absent:
        return ""
    span = f"{absent[0]}" if len(absent) == 1 else f"{absent[0]}..{absent[-1]}"
    return f"; the weights have no tensor of layer(s) {span}: is the config's layer count (num_hidden_layers) right?"


def check_finite(model, local: Path, dtype: torch.dtype) -> None:
    """Every loaded parameter is finite: a nan or inf weight (stored so, or overflowing the cast to
    ``dtype``) makes every number the model gives meaningless."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ModelLoadError(f"{local}: weight {name} holds nan or inf values (in the file, or from "
                                 f"converting it to {str(dtype).removeprefix('torch.')})")


def _load_pruned(local: Path, cls, config, dtype: torch.dtype, device: str):
    """Rebuild a pruned model with uneven shapes through its adapter ``cls`` and load its
    safetensors (written by ``shedder.formats.extract.save`` under module names; ``check_weights`` ran)."""
    model = instantiate(cls, config, device=device, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # before loading: the file holds a tied tensor once
    try:
        load_weights(model, str(local / WEIGHTS_FILE), strict=True, device=str(device))
    except RuntimeError as e:
        raise ModelLoadError(f"{local}: weights do not match the pruned structure in config.json ({e})") from None
    return model
