"""Is this LoRA adapter servable by vLLM on this base model? Checked with the stdlib only (no torch,
no safetensors package), so the Airflow environment can run it: adapter_config.json (peft
type LoRA, no DoRA/bias/modules_to_save, the base model, the rank against --max-lora-rank),
adapter_model.safetensors (a readable header, tensors that fit the base model's layers, no
pickle weights), links that stay inside the adapter directory, and a served name that cannot
escape a path. Used by tuneloop adapter check, the deploy and the vLLM evaluation backend."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import reprlib
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})

# config.json keys that differ between saves of the same weights.
VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"})
_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LORA_EMBEDDING = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHOWN = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxlevel = 60, 60, 4, 3, 2
#: At most this many bad entries of one pattern map are listed; the rest are counted.
MAX_LISTED = 3
_BIAS_VALUES = ("none", "all", "lora_only")


class AdapterValidationError(ValueError):
    """The adapter must not be sent to vLLM; the message lists every problem found."""

    def __init__(self, adapter_dir: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.adapter_dir = str(adapter_dir)
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"adapter {self.adapter_dir} cannot be deployed ({len(self.problems)} problem(s)):\n{listed}")


@dataclass(frozen=True)


class AdapterInfo:
    """What validation learned about an adapter; goes into the deploy report."""

    path: str
    peft_type: str
    rank: int
    lora_alpha: float
    target_modules: list[str] | str
    base_model: str
    base_match: str
    weights_bytes: int
    weights_sha256: str
    n_tensors: int
    n_parameters: int
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoraFields:
    """The adapter_config.json fields the tensor checks need, each of the right type."""

    rank: int
    alpha: float
    target_modules: list[str] | str
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _shown(value: Any) -> str:
    """A value from adapter_config.json for a message: its repr, clipped (a file may hold megabytes)."""
    text = {None: "null", True: "true", False: "false"}.get(value, "") if isinstance(value, bool | None) else _SHOWN.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _clipped(name: str) -> str:
    """A tensor or module name from the safetensors header for a message, clipped."""
    return name if len(name) <= 120 else name[:117] + "..."


def _wrong(key: str, value: Any, expected: str) -> str:
    return f"{key} is {_shown(value)}, expected {expected}"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex_problem(key: str, pattern: str, template: str = "{}") -> str | None:
    """A problem if ``pattern`` (as peft and vLLM use it, inside ``template``) does not compile."""
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError) as err:
        return f"{key} {_shown(pattern)} is not a valid regular expression ({err})"
    return None


def _pattern_map(key: str, value: Any, fits: Any, expected: str, problems: list[str]) -> dict[str, Any] | None:
    """``rank_pattern``/``alpha_pattern``: an object of module-name regexes to values (null: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(_wrong(key, value, f"an object mapping module name patterns to {expected}s"))
        return None
    bad = []
    for pattern, entry in value.items():
        regex_problem = _regex_problem(f"{key} key", pattern, r"(.*\.)?({})$")
        if regex_problem is not None:
            bad.append(regex_problem)
        elif not fits(entry):
            bad.append(_wrong(f"{key}[{_shown(pattern)}]", entry, f"a {expected}"))
    problems.extend(bad[:MAX_LISTED])
    if len(bad) > MAX_LISTED:
        problems.append(f"{key}: {len(bad) - MAX_LISTED} more bad entries")
    return None if bad else dict(value)


def _flag(config: Mapping[str, Any], key: str, problems: list[str]) -> bool:
    """A boolean feature switch (absent or null: off)."""
    value = config.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    problems.append(_wrong(key, value, "true or false"))
    return False


def read_lora_fields(config: Mapping[str, Any], problems: list[str]) -> LoraFields | None:
    """Check every adapter_config.json key this module and vLLM's PEFTHelper read, for type and
    value; append one problem per bad key (the key, its value clipped, what is expected).
    Returns the fields the tensor checks need, or None when one of them is unusable."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        problems.append(_wrong("peft_type", peft_type, "'LORA'"))
    rank = config.get("r")
    if not _is_int(rank) or rank <= 0:
        problems.append(_wrong("r", rank, "a positive integer"))
        rank = None
    alpha = config.get("lora_alpha")
    if "lora_alpha" not in config:
        problems.append("lora_alpha is missing: vLLM requires it (peft writes it; set it to the alpha the adapter was trained with)")
    elif not _is_number(alpha) or alpha <= 0:
        problems.append(_wrong("lora_alpha", alpha, "a positive number"))
    if not _is_number(alpha) or alpha <= 0:
        alpha = None
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets:
        regex_problem = _regex_problem("target_modules", targets)
        if regex_problem is not None:
            problems.append(regex_problem)
            targets = None
    elif isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        targets = list(targets)
    else:
        expected = "a non-empty list of module names or a regular expression"
        problems.append("target_modules is empty" if targets in (None, [], "") else _wrong("target_modules", targets, expected))
        targets = None
    rank_pattern = _pattern_map("rank_pattern", config.get("rank_pattern"), lambda v: _is_int(v) and v > 0, "positive integer", problems)
    alpha_pattern = _pattern_map("alpha_pattern", config.get("alpha_pattern"), lambda v: _is_number(v) and v > 0, "positive number", problems)
    if _flag(config, "use_dora", problems):
        problems.append("use_dora is true: vLLM does not serve DoRA adapters")
    _flag(config, "use_rslora", problems)
    lora_bias = _flag(config, "lora_bias", problems)
    bias = config.get("bias", "none")
    if bias is not None and bias not in _BIAS_VALUES:
        problems.append(_wrong("bias", bias, "one of " + ", ".join(repr(b) for b in _BIAS_VALUES)))
    elif bias not in (None, "none") or lora_bias:
        problems.append("the adapter trains biases (bias/lora_bias): vLLM does not support them")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None and not (isinstance(modules_to_save, list) and all(isinstance(m, str) for m in modules_to_save)):
        problems.append(_wrong("modules_to_save", modules_to_save, "null or a list of module names"))
    elif modules_to_save:
        problems.append(f"modules_to_save={_shown(modules_to_save)}: vLLM does not load full module copies")
    if rank is None or alpha is None or targets is None or rank_pattern is None or alpha_pattern is None:
        return None
    return LoraFields(rank, float(alpha), targets, rank_pattern, alpha_pattern)


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors header by hand (8-byte little-endian length + JSON).

    Returns ``{tensor name: {"dtype", "shape", "data_offsets"}}`` without ``__metadata__``.
    Raises ValueError naming the first inconsistency: a length beyond the file, bad JSON,
    an unknown dtype, a byte range that does not match dtype x shape, holes or overlaps.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path.name} is {size} bytes: too short for a safetensors header")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path.name}: header length {header_len} exceeds the file ({size} bytes)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - header_len
    tensors: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"{path.name}: tensor {_shown(name)} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValueError(f"{path.name}: tensor {_shown(name)} has unknown dtype {_shown(dtype)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path.name}: tensor {_shown(name)} has a bad shape {_shown(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{path.name}: tensor {_shown(name)} has bad data_offsets {_shown(offsets)}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise ValueError(
                f"{path.name}: tensor {_shown(name)} spans {offsets[1] - offsets[0]} bytes but "
                f"{dtype} x {shape} needs {expected}"
            )
        if offsets[1] > data_bytes:
            raise ValueError(
                f"{path.name}: tensor {_shown(name)} ends at byte {offsets[1]} of a {data_bytes}-byte data section"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"{path.name}: tensor {_shown(name)} starts at {begin}, expected {position} (hole or overlap)")
        position = end
    if position != data_bytes:
        raise ValueError(f"{path.name}: tensors cover {position} bytes of a {data_bytes}-byte data section")
    return tensors


def _hf_cache_dir(model_id: str) -> Path | None:
    """The local snapshot of a hub id in the Hugging Face cache, if there is one (no network)."""
    if model_id.count("/") != 1 or model_id.startswith((".", "/")):
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    repo = Path(hub) / ("models--" + model_id.replace("/", "--"))
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / revision
    return snapshot if (snapshot / "config.json").is_file() else None


def local_model_dir(model: str | os.PathLike[str]) -> Path | None:
    """A model's local directory: the path itself, or a hub id's cached snapshot; else None."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    return _hf_cache_dir(str(model))


def _model_config(model_dir: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text_config = config.get("text_config")
    return {**config, **text_config} if isinstance(text_config, dict) else config


def config_fingerprint(model_dir: Path) -> str | None:
    """sha256 of a model's config.json without the keys that vary between saves, or None."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    stable = {key: value for key, value in config.items() if key not in VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def _recipe_hash(model_dir: Path) -> str | None:
    """The demo model's build recipe hash (``tuneloop_model.json``), which pins its weights."""
    try:
        record = json.loads((model_dir / "tuneloop_model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = record.get("recipe_hash") if isinstance(record, dict) else None
    return str(value) if value else None


def compare_base_models(trained_on: str, served: str) -> tuple[bool, str]:
    """Is ``trained_on`` (from adapter_config.json) the model ``served``? Returns (same, how/why).

    Same string or same resolved directory: same. Two different local directories: same if
    their config.json match (less save-dependent keys) and, where both are tuneloop demo
    models, their build recipes match. A side that cannot be found locally: not the same.
    """
    if trained_on == served:
        return True, "same name"
    trained_dir, served_dir = local_model_dir(trained_on), local_model_dir(served)
    if trained_dir is not None and served_dir is not None:
        if trained_dir.resolve() == served_dir.resolve():
            return True, "same path"
        trained_fp = config_fingerprint(trained_dir) or "unreadable"
        served_fp = config_fingerprint(served_dir) or "unreadable"
        trained_recipe, served_recipe = _recipe_hash(trained_dir) or "", _recipe_hash(served_dir) or ""
        recipes_differ = bool(trained_recipe and served_recipe and trained_recipe != served_recipe)
        if trained_fp != "unreadable" and trained_fp == served_fp and not recipes_differ:
            return True, f"same config.json (sha256 {served_fp[:12]})"
        why = (
            f"the adapter was trained on {trained_on} ({trained_dir.resolve()}, config sha256 "
            f"{trained_fp[:12]}) but the server's base is {served} ({served_dir.resolve()}, "
            f"config sha256 {served_fp[:12]})"
        )
        if recipes_differ:
            why += f"; demo build recipes differ ({trained_recipe[:12]} vs {served_recipe[:12]})"
        return False, why
    missing = trained_on if trained_dir is None else served
    return False, (
        f"the adapter was trained on {trained_on} but the server's base is {served}, and {missing} "
        "is not a model directory here, so they cannot be compared"
    )


def _size(base_config: Mapping[str, Any], key: str, default: int) -> int:
    """A positive integer size from the base model's config.json (absent or null: ``default``)."""
    value = base_config.get(key)
    if value is None:
        return default
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{key} is {_shown(value)}, not a positive integer")
    return int(value)


def _module_dims(base_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the Llama-family projection layers; ValueError for a
    config.json whose sizes are not positive integers."""
    hidden = _size(base_config, "hidden_size", 0)
    heads = _size(base_config, "num_attention_heads", 1)
    kv_heads = _size(base_config, "num_key_value_heads", heads)
    head_dim = _size(base_config, "head_dim", hidden // heads)
    intermediate = _size(base_config, "intermediate_size", 4 * hidden)
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def _targets(module: str, target_modules: list[str] | str) -> bool:
    """peft's rule: a list entry matches a module name or its dotted suffix; a string is a regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == target or module.endswith("." + target) for target in target_modules)


def _rank_for(module: str, rank: int, rank_pattern: Mapping[str, int]) -> int:
    for key, value in rank_pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return int(value)
    return rank


def _check_tensors(
    tensors: Mapping[str, Mapping[str, Any]],
    fields: LoraFields,
    base_config: Mapping[str, Any] | None,
    problems: list[str],
    warnings: list[str],
) -> int:
    """Check names, dtypes and shapes against LoRA A/B and the base model; returns #parameters."""
    if not tensors:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
        return 0
    target_modules, rank, rank_pattern = fields.target_modules, fields.rank, fields.rank_pattern
    dims: dict[str, tuple[int, int]] | None = None
    hidden = n_layers = 0
    if base_config and base_config.get("hidden_size") is not None:
        try:
            dims, hidden, n_layers = _module_dims(base_config), _size(base_config, "hidden_size", 0), _size(base_config, "num_hidden_layers", 0)
        except ValueError as err:
            dims = None
            warnings.append(f"the base model's config.json is malformed ({err}): tensor shapes were not checked against it")
    pairs: dict[str, dict[str, list[int]]] = {}
    n_parameters = 0
    for name, entry in tensors.items():
        n_parameters += math.prod(entry["shape"])
        match = _LORA_TENSOR.match(name) or _LORA_EMBEDDING.match(name)
        if match is None:
            problems.append(f"tensor {_clipped(name)} is not a LoRA A/B matrix (vLLM refuses extra weights)")
            continue
        if entry["dtype"] not in FLOAT_DTYPES:
            problems.append(f"tensor {_clipped(name)} has dtype {entry['dtype']}, expected one of {sorted(FLOAT_DTYPES)}")
        if len(entry["shape"]) != 2:
            problems.append(f"tensor {_clipped(name)} has shape {_shown(entry['shape'])}, expected a 2-D matrix")
            continue
        module = match["module"].removeprefix("base_model.model.")
        kind = "A" if match["kind"].endswith("A") else "B"
        pairs.setdefault(module, {})[kind] = list(entry["shape"])
    unmatched = set(target_modules) if isinstance(target_modules, list) else set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"module {_clipped(module)} has lora_{''.join(pair)} but not lora_{'B' if 'A' in pair else 'A'}")
            continue
        if "embed" in module:  # lora_embedding_A/B are stored transposed; leave them to vLLM
            continue
        if not _targets(module, target_modules):
            problems.append(f"module {_clipped(module)} is not in target_modules {_shown(target_modules)}")
        unmatched = {t for t in unmatched if not (module == t or module.endswith("." + t))}
        (a_rows, a_cols), (b_rows, b_cols) = pair["A"], pair["B"]
        want_rank = _rank_for(module, rank, rank_pattern)
        if a_rows != want_rank or b_cols != want_rank:
            problems.append(
                f"module {_clipped(module)}: lora_A {pair['A']} / lora_B {pair['B']} do not have rank {want_rank} "
                "from adapter_config.json"
            )
        layer = _LAYER_INDEX.search("." + module + ".")
        if layer is not None and n_layers and int(layer.group(1)) >= n_layers:
            problems.append(f"module {_clipped(module)}: the base model has only {n_layers} layers")
        if dims is None:
            continue
        leaf = module.rsplit(".", 1)[-1]
        if leaf in dims:
            want_in, want_out = dims[leaf]
            if a_cols != want_in or b_rows != want_out:
                problems.append(
                    f"module {_clipped(module)}: LoRA maps {a_cols} -> {b_rows} features but the base model's "
                    f"{leaf} maps {want_in} -> {want_out} (hidden_size {hidden})"
                )
        elif hidden not in (a_cols, b_rows):
            problems.append(
                f"module {_clipped(module)}: LoRA maps {a_cols} -> {b_rows} features; neither side is the base "
                f"model's hidden_size {hidden}"
            )
    if unmatched and pairs:
        warnings.append(f"target_modules {_shown(sorted(unmatched))} have no LoRA weights in {ADAPTER_WEIGHTS}")
    if dims is None and not any(w.startswith("the base model's config.json is malformed") for w in warnings):
        warnings.append("the base model's config.json is not available here: tensor shapes were not checked against it")
    return n_parameters


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _escapes(root: Path) -> Iterator[str]:
    """Entries of ``root`` that lead outside it: symlinks (to files or folders) whose target
    lies elsewhere. vLLM follows them when it reads the adapter, so an adapter directory
    could otherwise make the server read any file it can see."""
    top = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            entry = Path(dirpath) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if target != top and top not in target.parents:
                yield f"{entry.relative_to(root)} is a link to {target}, outside the adapter directory"


def check_lora_name(name: str) -> str:
    """A LoRA name vLLM may serve and a path may hold: letters, digits, ``._-``, no ``..``."""
    if not _LORA_NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"adapter name {_shown(name)} is not allowed: use letters, digits, '.', '_' and '-' "
            "(no '/', no '..'), at most 64 characters"
        )
    return name


def validate_adapter(
    adapter_dir: str | os.PathLike[str],
    *,
    base_model_dir_or_id: str | os.PathLike[str],
    max_lora_rank: int,
) -> AdapterInfo:
    """Check an adapter directory before any of it is sent to vLLM; raise listing every problem.

    Checks: ``adapter_config.json`` parses, ``peft_type == "LORA"``, features vLLM supports,
    the base model it was trained on is the served one, ``r`` (and ``rank_pattern``) within
    ``max_lora_rank``, weights are ``adapter_model.safetensors`` (no pickles), its header
    parses, and the tensors are LoRA A/B pairs of the configured rank for the target modules
    with the base model's layer sizes (read from its ``config.json``).
    """
    root = Path(adapter_dir)
    served = str(base_model_dir_or_id)
    if not root.is_dir():
        raise AdapterValidationError(root, [f"{root} is not a directory"])
    problems: list[str] = list(_escapes(root))
    warnings: list[str] = []

    config: dict[str, Any] | None = None
    config_path = root / ADAPTER_CONFIG
    if not config_path.is_file():
        problems.append(f"{ADAPTER_CONFIG} is missing")
    else:
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{ADAPTER_CONFIG} is not valid JSON: {err}")
        else:
            if isinstance(loaded, dict):
                config = loaded
            else:
                problems.append(f"{ADAPTER_CONFIG} holds a JSON {type(loaded).__name__}, not an object")

    rank, alpha, base_match = 0, 0.0, ""
    trained_on = ""
    fields: LoraFields | None = None
    if config is not None:
        fields = read_lora_fields(config, problems)
        raw_rank = config.get("r")
        if _is_int(raw_rank) and raw_rank > 0:
            pattern = config.get("rank_pattern")
            pattern_ranks = [v for v in pattern.values() if _is_int(v)] if isinstance(pattern, dict) else []
            rank = max([raw_rank, *pattern_ranks])
            if rank > max_lora_rank:
                problems.append(
                    f"rank {rank} exceeds the server's max_lora_rank {max_lora_rank} "
                    "(retrain with a smaller rank or restart vLLM with a larger --max-lora-rank)"
                )
        alpha = fields.alpha if fields is not None else 0.0
        trained_on_value = config.get("base_model_name_or_path")
        if trained_on_value is None or trained_on_value == "":
            problems.append("base_model_name_or_path is missing: cannot tell which base model it was trained on")
        elif not isinstance(trained_on_value, str):
            problems.append(_wrong("base_model_name_or_path", trained_on_value, "the base model's hub id or path"))
        else:
            trained_on = trained_on_value
            same, how = compare_base_models(trained_on, served)
            if same:
                base_match = how
            else:
                problems.append(f"base model mismatch: {how}")

    pickles = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    pickled_weights = [name for name in pickles if name.startswith("adapter_model.")]
    if pickled_weights:
        # vLLM falls back to adapter_model.bin/.pt: a pickle, which can run code when loaded.
        problems.append(
            f"pickle weights {pickled_weights} are refused (unpickling can run code): "
            f"save with safe_serialization=True so only {ADAPTER_WEIGHTS} is there"
        )
    elif pickles:
        warnings.append(f"pickle files {pickles} lie in the adapter directory (vLLM does not read them)")
    weights = root / ADAPTER_WEIGHTS
    tensors: dict[str, dict[str, Any]] | None = None
    if not weights.is_file():
        problems.append(f"{ADAPTER_WEIGHTS} is missing")
    else:
        try:
            tensors = read_safetensors_header(weights)
        except (OSError, ValueError) as err:
            problems.append(f"corrupt safetensors: {err}")

    n_parameters = 0
    if tensors is not None and fields is not None:
        base_dir = local_model_dir(served)
        base_config = _model_config(base_dir) if base_dir is not None else None
        n_parameters = _check_tensors(tensors, fields, base_config, problems, warnings)

    if problems:
        raise AdapterValidationError(root, problems)
    assert config is not None and fields is not None and tensors is not None
    for warning in warnings:
        logger.warning("adapter %s: %s", root, warning)
    return AdapterInfo(
        path=str(root.resolve()),
        peft_type=str(config["peft_type"]),
        rank=rank,
        lora_alpha=alpha,
        target_modules=fields.target_modules,
        base_model=trained_on,
        base_match=base_match,
        weights_bytes=weights.stat().st_size,
        weights_sha256=_sha256(weights),
        n_tensors=len(tensors),
        n_parameters=n_parameters,
        warnings=warnings,
    )
