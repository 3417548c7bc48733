"""Hot-swap a LoRA adapter into running vLLM servers, verify it, and roll back on any failure.

The base model is served as ``<name>-base``; clients call ``<name>``, a LoRA adapter name.
Deploys use only two adapter names on a server: the stable ``<name>`` and ``<name>-staging``,
and every load is in place (``load_inplace``), which swaps the weights behind a name with no
window in which the name is missing and never grows vLLM's adapter cache (see FACTS.md).
(An evaluation through vLLM adds a temporary ``<name>-eval-<hex>`` while it runs and unloads
it afterwards: see ``tuneloop.ml.evaluate.VllmBackend``.)

First ``validate`` (the adapter, the golden set, the rollback target) and ``preflight`` (every
endpoint is healthy and serves ``<name>-base``) run before anything is loaded anywhere. Then
each endpoint goes through these steps (names as in reports and errors):

``health`` -> ``load_staging`` -> ``verify_staging`` -> ``snapshot_stable`` -> ``load_stable``
-> ``verify_stable``; a failure after ``load_stable`` began runs ``restore`` (the previous
adapter back into the stable name, in place, and checked to answer as before the swap).
A request in flight during ``load_stable`` keeps running and may finish on the new weights.

Endpoints are deployed in canary order: the first one fully, then the others; when a later
endpoint fails, the ones already swapped are restored too. The adapter is validated before
anything is sent (:func:`validate_adapter`), with stdlib only, so this module also runs in the
Airflow environment (no torch, no safetensors package).

vLLM re-reads an adapter loaded in place from disk while it serves it, and a server whose
adapter directory disappeared died on the next request (EngineDeadError; seen on 0.32): a
deployed adapter directory, and the previous one kept for rollback, must stay on disk,
unchanged, while they may be served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuneloop.serving.vllm_client import Prompt, VllmClient, VllmError

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
STAGING_SUFFIX = "-staging"
BASE_SUFFIX = "-base"
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

Scorer = Callable[[str, str], float]
Progress = Callable[[str], None]


def staging_name(served_name: str) -> str:
    """The adapter name new versions are loaded and verified under before the stable name."""
    return served_name + STAGING_SUFFIX


def base_name(served_name: str) -> str:
    """The name the base model is served under (``--served-model-name``)."""
    return served_name + BASE_SUFFIX


def exact_match(answer: str, expected: str) -> float:
    """1.0 if the answer equals the expected text (surrounding whitespace ignored), else 0.0."""
    return float(answer.strip() == expected.strip())


# -- adapter validation ---------------------------------------------------------------------


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
            raise ValueError(f"{path.name}: tensor {name!r} lacks dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{path.name}: tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise ValueError(f"{path.name}: tensor {name!r} has bad data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise ValueError(
                f"{path.name}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but "
                f"{dtype} x {shape} needs {expected}"
            )
        if offsets[1] > data_bytes:
            raise ValueError(
                f"{path.name}: tensor {name!r} ends at byte {offsets[1]} of a {data_bytes}-byte data section"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ValueError(f"{path.name}: tensor {name!r} starts at {begin}, expected {position} (hole or overlap)")
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


def _module_dims(base_config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the Llama-family projection layers."""
    hidden = int(base_config["hidden_size"])
    heads = int(base_config.get("num_attention_heads") or 1)
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    head_dim = int(base_config.get("head_dim") or hidden // heads)
    intermediate = int(base_config.get("intermediate_size") or 4 * hidden)
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
    config: Mapping[str, Any],
    base_config: Mapping[str, Any] | None,
    problems: list[str],
    warnings: list[str],
) -> int:
    """Check names, dtypes and shapes against LoRA A/B and the base model; returns #parameters."""
    if not tensors:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
        return 0
    target_modules = config.get("target_modules") or []
    rank = int(config.get("r") or 0)
    rank_pattern = config.get("rank_pattern") or {}
    hidden = int(base_config["hidden_size"]) if base_config and "hidden_size" in base_config else 0
    dims = _module_dims(base_config) if base_config and hidden else None
    n_layers = int(base_config.get("num_hidden_layers") or 0) if base_config else 0
    pairs: dict[str, dict[str, list[int]]] = {}
    n_parameters = 0
    for name, entry in tensors.items():
        n_parameters += math.prod(entry["shape"])
        match = _LORA_TENSOR.match(name) or _LORA_EMBEDDING.match(name)
        if match is None:
            problems.append(f"tensor {name} is not a LoRA A/B matrix (vLLM refuses extra weights)")
            continue
        if entry["dtype"] not in FLOAT_DTYPES:
            problems.append(f"tensor {name} has dtype {entry['dtype']}, expected one of {sorted(FLOAT_DTYPES)}")
        if len(entry["shape"]) != 2:
            problems.append(f"tensor {name} has shape {entry['shape']}, expected a 2-D matrix")
            continue
        module = match["module"].removeprefix("base_model.model.")
        kind = "A" if match["kind"].endswith("A") else "B"
        pairs.setdefault(module, {})[kind] = list(entry["shape"])
    unmatched = set(target_modules) if isinstance(target_modules, list) else set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"module {module} has lora_{''.join(pair)} but not lora_{'B' if 'A' in pair else 'A'}")
            continue
        if "embed" in module:  # lora_embedding_A/B are stored transposed; leave them to vLLM
            continue
        if not _targets(module, target_modules):
            problems.append(f"module {module} is not in target_modules {target_modules}")
        unmatched = {t for t in unmatched if not (module == t or module.endswith("." + t))}
        (a_rows, a_cols), (b_rows, b_cols) = pair["A"], pair["B"]
        want_rank = _rank_for(module, rank, rank_pattern)
        if a_rows != want_rank or b_cols != want_rank:
            problems.append(
                f"module {module}: lora_A {pair['A']} / lora_B {pair['B']} do not have rank {want_rank} "
                "from adapter_config.json"
            )
        layer = _LAYER_INDEX.search("." + module + ".")
        if layer is not None and n_layers and int(layer.group(1)) >= n_layers:
            problems.append(f"module {module}: the base model has only {n_layers} layers")
        if dims is None:
            continue
        leaf = module.rsplit(".", 1)[-1]
        if leaf in dims:
            want_in, want_out = dims[leaf]
            if a_cols != want_in or b_rows != want_out:
                problems.append(
                    f"module {module}: LoRA maps {a_cols} -> {b_rows} features but the base model's "
                    f"{leaf} maps {want_in} -> {want_out} (hidden_size {hidden})"
                )
        elif hidden not in (a_cols, b_rows):
            problems.append(
                f"module {module}: LoRA maps {a_cols} -> {b_rows} features; neither side is the base "
                f"model's hidden_size {hidden}"
            )
    if unmatched and pairs:
        warnings.append(f"target_modules {sorted(unmatched)} have no LoRA weights in {ADAPTER_WEIGHTS}")
    if dims is None:
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
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
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
    if config is not None:
        if config.get("peft_type") != "LORA":
            problems.append(f"peft_type is {config.get('peft_type')!r}, expected 'LORA'")
        raw_rank = config.get("r")
        if not isinstance(raw_rank, int) or isinstance(raw_rank, bool) or raw_rank <= 0:
            problems.append(f"r is {raw_rank!r}, expected a positive integer")
        else:
            pattern = config.get("rank_pattern") or {}
            rank = max([raw_rank, *(int(v) for v in pattern.values())]) if isinstance(pattern, dict) else raw_rank
            if rank > max_lora_rank:
                problems.append(
                    f"rank {rank} exceeds the server's max_lora_rank {max_lora_rank} "
                    "(retrain with a smaller rank or restart vLLM with a larger --max-lora-rank)"
                )
        alpha = float(config.get("lora_alpha") or 0.0)
        if not config.get("target_modules"):
            problems.append("target_modules is empty")
        if config.get("use_dora"):
            problems.append("use_dora is true: vLLM does not serve DoRA adapters")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            problems.append("the adapter trains biases (bias/lora_bias): vLLM does not support them")
        if config.get("modules_to_save"):
            problems.append(f"modules_to_save={config['modules_to_save']}: vLLM does not load full module copies")
        trained_on = str(config.get("base_model_name_or_path") or "")
        if not trained_on:
            problems.append("base_model_name_or_path is missing: cannot tell which base model it was trained on")
        else:
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
    if tensors is not None and config is not None:
        base_dir = local_model_dir(served)
        base_config = _model_config(base_dir) if base_dir is not None else None
        n_parameters = _check_tensors(tensors, config, base_config, problems, warnings)

    if problems:
        raise AdapterValidationError(root, problems)
    assert config is not None and tensors is not None
    for warning in warnings:
        logger.warning("adapter %s: %s", root, warning)
    return AdapterInfo(
        path=str(root.resolve()),
        peft_type=str(config["peft_type"]),
        rank=rank,
        lora_alpha=alpha,
        target_modules=config["target_modules"],
        base_model=trained_on,
        base_match=base_match,
        weights_bytes=weights.stat().st_size,
        weights_sha256=_sha256(weights),
        n_tensors=len(tensors),
        n_parameters=n_parameters,
        warnings=warnings,
    )


# -- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GoldenCase:
    """A prompt and the answer the evaluation measured (None: only compared between names)."""

    id: str
    prompt: Prompt
    expected: str | None


# Asked when the caller has no golden set: the stable name must then answer them exactly as
# the staging name did, which still catches a load that did not take or stale cached blocks.
SMOKE_PROMPTS = (
    "Reply with one word: ready?",
    "What is 2 + 3? Answer with the number.",
    "Summarise: the quick brown fox jumps over the lazy dog.",
)


def smoke_cases() -> list[GoldenCase]:
    """Prompts without expectations, for a deploy that has no golden set."""
    return [GoldenCase(id=f"smoke-{i}", prompt=prompt, expected=None) for i, prompt in enumerate(SMOKE_PROMPTS)]


def golden_cases(golden: Sequence[Mapping[str, Any] | GoldenCase]) -> list[GoldenCase]:
    """Normalise ``[{"id", "prompt", "expected"}, ...]``; raise ValueError if malformed."""
    cases: list[GoldenCase] = []
    for index, item in enumerate(golden):
        if isinstance(item, GoldenCase):
            cases.append(item)
            continue
        missing = {"prompt", "expected"} - set(item)
        if missing:
            raise ValueError(f"golden[{index}] lacks {sorted(missing)}")
        cases.append(GoldenCase(id=str(item.get("id", index)), prompt=item["prompt"], expected=str(item["expected"])))
    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("golden ids must be unique")
    return cases


@dataclass
class Verification:
    """How one served name answered the golden prompts."""

    model: str
    n: int
    agreement: float | None  # None: no expectations to score (smoke prompts)
    min_agreement: float
    consistency: float | None = None
    ok: bool = False
    seconds: float = 0.0
    answers: dict[str, str] = field(default_factory=dict)
    mismatches: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        if self.agreement is None:
            text = f"{self.model}: answered {self.n} smoke prompts (no golden set)"
        else:
            text = f"{self.model}: golden agreement {self.agreement:.2f} (min {self.min_agreement:.2f}, n={self.n})"
        if self.consistency is not None:
            text += f", same answers as reference {self.consistency:.2f}"
        if self.mismatches:
            first = self.mismatches[0]
            text += f"; e.g. {first['id']}: expected {first['expected']!r}, got {first['got']!r}"
        return text

    def to_dict(self, *, with_answers: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_answers:
            data.pop("answers")
        return data


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def verify_served(
    client: VllmClient,
    model: str,
    golden: Sequence[Mapping[str, Any] | GoldenCase],
    *,
    min_agreement: float,
    scorer: Scorer = exact_match,
    max_tokens: int = 96,
    concurrency: int = 8,
    reference: Mapping[str, str] | None = None,
) -> Verification:
    """Ask ``model`` the golden prompts (greedy) and score the answers against the expectations.

    ``reference`` (answers by id, e.g. from the staging name) adds an exact-match consistency
    figure that must also reach ``min_agreement``: it catches a name that still answers with
    old weights even where the golden expectations cannot tell the versions apart.
    Cases whose ``expected`` is None are asked but not scored. Request failures raise
    :class:`VllmError`.
    """
    cases = golden_cases(golden)
    if not cases:
        raise ValueError("verify_served needs at least one prompt")
    started = time.perf_counter()
    answers = client.chat_many(model, [case.prompt for case in cases], max_tokens=max_tokens, concurrency=concurrency)
    scores = []
    mismatches = []
    for case, answer in zip(cases, answers, strict=True):
        if case.expected is None:
            continue
        score = float(scorer(answer, case.expected))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"scorer returned {score} for golden {case.id}; scores must lie in [0, 1]")
        scores.append(score)
        if score < 1.0:
            mismatches.append({"id": case.id, "expected": _clip(case.expected), "got": _clip(answer)})
    result = Verification(
        model=model,
        n=len(cases),
        agreement=sum(scores) / len(scores) if scores else None,
        min_agreement=min_agreement,
        answers={case.id: answer for case, answer in zip(cases, answers, strict=True)},
        mismatches=mismatches[:5],
    )
    if reference is not None:
        same = [exact_match(result.answers[case.id], reference.get(case.id, "\0")) for case in cases]
        result.consistency = sum(same) / len(same)
        if not result.mismatches:
            result.mismatches = [
                {"id": case.id, "expected": _clip(reference.get(case.id, "")), "got": _clip(result.answers[case.id])}
                for case, agrees in zip(cases, same, strict=True)
                if not agrees
            ][:5]
    result.ok = (result.agreement is None or result.agreement >= min_agreement) and (
        result.consistency is None or result.consistency >= min_agreement
    )
    result.seconds = round(time.perf_counter() - started, 4)
    return result


# -- deploy report --------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One step on one endpoint: its outcome and duration."""

    step: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class EndpointReport:
    """Everything that happened on one endpoint.

    ``status``: ``pending`` (not reached), ``deployed``, ``failed`` (stable name untouched),
    ``rolled_back`` (previous adapter restored and verified), ``rollback_failed``.
    """

    endpoint: str
    status: str = "pending"
    previous_served: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    staging: dict[str, Any] | None = None
    stable: dict[str, Any] | None = None
    swap_seconds: float | None = None


@dataclass
class DeployReport:
    """The result of :func:`deploy_adapter`; ``to_dict``/``to_json`` give the artifact form."""

    adapter_dir: str
    served_path: str
    served_name: str
    staging_name: str
    base_model: str
    previous_adapter_dir: str | None
    started_at: str
    verification: str = "golden"  # "golden": answers scored as evaluated; "smoke": staging == stable only
    ok: bool = False
    seconds: float = 0.0
    adapter: dict[str, Any] | None = None
    endpoints: list[EndpointReport] = field(default_factory=list)
    failed_endpoint: str | None = None
    failed_step: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class DeployError(RuntimeError):
    """A deploy failed; the message names the endpoint, the step, the cause and what was rolled back."""

    def __init__(
        self,
        message: str,
        *,
        step: str,
        endpoint: str | None = None,
        report: DeployReport | None = None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.endpoint = endpoint
        self.report = report


class _StepFailed(Exception):
    """Internal: a step failed on an endpoint (carries the step name and cause text)."""

    def __init__(self, step: str, cause: str) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


@contextmanager
def _step(report: EndpointReport, name: str, progress: Progress) -> Iterator[StepRecord]:
    """Time a step, record it, and turn any exception into :class:`_StepFailed`."""
    record = StepRecord(step=name, ok=False, seconds=0.0)
    report.steps.append(record)
    started = time.perf_counter()
    try:
        yield record
    except _StepFailed as err:
        record.detail = err.cause
        raise
    except Exception as err:  # any failure of a step is that step's failure (and may roll back)
        record.detail = str(err) if isinstance(err, VllmError | ValueError | OSError) else f"{type(err).__name__}: {err}"
        raise _StepFailed(name, record.detail) from err
    else:
        record.ok = True
    finally:
        record.seconds = round(time.perf_counter() - started, 4)
        outcome = "ok" if record.ok else "FAILED"
        detail = f": {record.detail}" if record.detail else ""
        progress(f"{report.endpoint} {name} {outcome} ({record.seconds * 1000:.0f} ms){detail}")


def _check_root(client: VllmClient, name: str, path: str) -> None:
    """The server must list ``name`` as serving ``path`` after a load."""
    served = client.adapters().get(name)
    if served != path:
        raise ValueError(f"after the load the server lists {name} -> {served!r}, expected {path!r}")


# -- restore --------------------------------------------------------------------------------


def restore(
    client: VllmClient,
    *,
    served_name: str,
    previous_adapter_dir: str | os.PathLike[str] | None,
    prompts: Sequence[Prompt] = (),
    baseline: Sequence[str] | None = None,
    min_agreement: float = 1.0,
    max_tokens: int = 96,
) -> str:
    """Put the previous adapter back into the stable name (in place) and check it answers again.

    With ``previous_adapter_dir=None`` (first deploy) the stable name is unloaded instead.
    ``baseline`` (answers the stable name gave to ``prompts`` before the swap) must be matched
    to at least ``min_agreement``. Returns a one-line description; raises :class:`DeployError`.
    """
    endpoint = client.base_url
    try:
        if previous_adapter_dir is None:
            if served_name not in client.adapters():
                return f"{served_name} is not loaded (there was no previous adapter)"
            client.unload_adapter(served_name)
            if served_name in client.adapters():
                raise DeployError(
                    f"restore on {endpoint}: {served_name} is still listed after unloading it",
                    step="restore",
                    endpoint=endpoint,
                )
            return f"unloaded {served_name} (there was no previous adapter)"
        path = str(Path(previous_adapter_dir).resolve())
        client.load_adapter(served_name, path, inplace=True)
        listed = client.adapters().get(served_name)
        if listed != path:
            raise DeployError(
                f"restore on {endpoint}: {served_name} lists {listed!r} after loading {path}",
                step="restore",
                endpoint=endpoint,
            )
        answers = client.chat_many(served_name, list(prompts), max_tokens=max_tokens) if prompts else []
        if not prompts:
            client.chat(served_name, "ping", max_tokens=1)
        if baseline is not None and prompts:
            same = sum(exact_match(a, b) for a, b in zip(answers, baseline, strict=True)) / len(answers)
            if same < min_agreement:
                raise DeployError(
                    f"restore on {endpoint}: {served_name} now serves {path} but only {same:.2f} of its "
                    f"answers match those before the swap (min {min_agreement:.2f})",
                    step="restore",
                    endpoint=endpoint,
                )
            return f"restored {served_name} -> {path}; {same:.2f} of answers as before the swap"
        return f"restored {served_name} -> {path}; it answers"
    except VllmError as err:
        raise DeployError(f"restore on {endpoint} failed: {err}", step="restore", endpoint=endpoint) from err


# -- deploy ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What every endpoint's deploy needs (built once by :func:`deploy_adapter`)."""

    served_name: str
    staging: str
    path: str
    cases: list[GoldenCase]
    previous: str | None
    scorer: Scorer
    min_agreement: float
    max_tokens: int
    progress: Progress
    baselines: dict[str, list[str]] = field(default_factory=dict)
    restore_targets: dict[str, str | None] = field(default_factory=dict)


def _deploy_endpoint(client: VllmClient, report: EndpointReport, plan: _Plan) -> None:
    """Deploy to one endpoint; on a failure after the stable swap began, restore it, then raise."""
    stable, staging, progress = plan.served_name, plan.staging, plan.progress
    prompts = [case.prompt for case in plan.cases]
    with _step(report, "health", progress):
        client.check_health()
        report.previous_served = client.adapters().get(stable)
    with _step(report, "load_staging", progress) as record:
        record.detail = client.load_adapter(staging, plan.path, inplace=True)
        _check_root(client, staging, plan.path)
    with _step(report, "verify_staging", progress) as record:
        staged = verify_served(
            client, staging, plan.cases, min_agreement=plan.min_agreement, scorer=plan.scorer, max_tokens=plan.max_tokens
        )
        report.staging = staged.to_dict()
        record.detail = staged.summary()
        if not staged.ok:
            raise _StepFailed("verify_staging", staged.summary())
    target = plan.previous if plan.previous is not None else report.previous_served
    if plan.previous is not None and report.previous_served not in (None, plan.previous):
        logger.warning(
            "%s serves %s as %s, but the caller's previous adapter is %s: a rollback restores the latter",
            client.base_url, report.previous_served, stable, plan.previous,
        )
    plan.restore_targets[client.base_url] = target
    if report.previous_served is not None:
        with _step(report, "snapshot_stable", progress) as record:
            plan.baselines[client.base_url] = client.chat_many(stable, prompts, max_tokens=plan.max_tokens)
            record.detail = f"{len(prompts)} answers of {stable} ({report.previous_served}) kept to check a rollback"
    try:
        with _step(report, "load_stable", progress) as record:
            record.detail = client.load_adapter(stable, plan.path, inplace=True)
            _check_root(client, stable, plan.path)
        report.swap_seconds = record.seconds
        with _step(report, "verify_stable", progress) as record:
            served = verify_served(
                client,
                stable,
                plan.cases,
                min_agreement=plan.min_agreement,
                scorer=plan.scorer,
                max_tokens=plan.max_tokens,
                reference=staged.answers,
            )
            report.stable = served.to_dict()
            record.detail = served.summary()
            if not served.ok:
                raise _StepFailed("verify_stable", served.summary())
    except BaseException:  # a failed step, or an interrupt: put the previous adapter back first
        report.status = "rolled_back" if _restore_endpoint(client, report, plan) else "rollback_failed"
        raise
    report.status = "deployed"


def _restore_endpoint(client: VllmClient, report: EndpointReport, plan: _Plan) -> bool:
    """Restore one endpoint's stable name; record the step; True if it was verified."""
    target = plan.restore_targets.get(client.base_url)
    baseline = plan.baselines.get(client.base_url)
    # Compare with the pre-swap answers only if we put back what was serving then.
    compare = baseline is not None and target is not None and report.previous_served == str(Path(target).resolve())
    try:
        with _step(report, "restore", plan.progress) as record:
            try:
                record.detail = restore(
                    client,
                    served_name=plan.served_name,
                    previous_adapter_dir=target,
                    prompts=[case.prompt for case in plan.cases],
                    baseline=baseline if compare else None,
                    min_agreement=plan.min_agreement,
                    max_tokens=plan.max_tokens,
                )
            except DeployError as err:
                raise _StepFailed("restore", str(err)) from err
    except _StepFailed:
        logger.error("ROLLBACK FAILED on %s: %s", client.base_url, report.steps[-1].detail)
        return False
    return True


def _reporter(progress: Progress | None) -> Progress:
    """Where a step's lines go: the caller's progress callback (an Airflow task's is its
    logger), else this module's logger; never both, or task logs show every line twice."""
    return progress if progress is not None else lambda message: logger.info("%s", message)


def deploy_adapter(
    endpoints: Sequence[str],
    adapter_dir: str | os.PathLike[str],
    *,
    served_name: str,
    golden: Sequence[Mapping[str, Any] | GoldenCase],
    previous_adapter_dir: str | os.PathLike[str] | None,
    api_key: str | None = None,
    max_lora_rank: int,
    base_model: str | os.PathLike[str],
    verify_min_agreement: float = 0.8,
    scorer: Scorer = exact_match,
    max_tokens: int = 96,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
) -> DeployReport:
    """Validate ``adapter_dir``, then hot-swap it into the stable name on every endpoint.

    ``golden`` holds ``{"id", "prompt", "expected"}`` with the answers the evaluation measured
    for this adapter; ``scorer(answer, expected) -> [0, 1]`` (exact match by default) and
    ``verify_min_agreement`` decide whether a served name answers as it should. An empty
    ``golden`` (e.g. a manual redeploy with no eval scores at hand) is allowed but weaker: the
    report says ``verification: "smoke"``, and the stable name must answer a few smoke
    prompts exactly as staging did (which still catches a swap that did not take).
    ``previous_adapter_dir`` is what to restore on failure (None: first deploy; then the
    adapter the server lists for the stable name, if any, else the name is unloaded).
    Returns the report on success; raises :class:`DeployError` (with ``.report``) otherwise.
    """
    say = _reporter(progress)

    if not endpoints:
        raise ValueError("no vLLM endpoints given")
    if not 0.0 < verify_min_agreement <= 1.0:
        raise ValueError(f"verify_min_agreement must lie in (0, 1], got {verify_min_agreement}")
    started = time.perf_counter()
    path = str(Path(adapter_dir).resolve())
    previous = str(Path(previous_adapter_dir).resolve()) if previous_adapter_dir is not None else None
    report = DeployReport(
        adapter_dir=str(adapter_dir),
        served_path=path,
        served_name=served_name,
        staging_name=staging_name(served_name),
        base_model=str(base_model),
        previous_adapter_dir=previous,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        endpoints=[EndpointReport(endpoint=url.rstrip("/")) for url in endpoints],
    )

    def fail(step: str, endpoint: str | None, cause: str) -> DeployError:
        report.ok, report.failed_step, report.failed_endpoint = False, step, endpoint
        report.seconds = round(time.perf_counter() - started, 3)
        where = f" to {endpoint}" if endpoint else ""
        report.error = f"deploy of {path}{where} failed at step {step}: {cause}"
        return DeployError(report.error, step=step, endpoint=endpoint, report=report)

    try:
        cases = golden_cases(golden)
    except ValueError as err:
        raise fail("validate", None, str(err)) from err
    if not cases:
        cases = smoke_cases()
        report.verification = "smoke"
        logger.warning(
            "deploy of %s has no golden prompts: verifying only that %s answers like %s on smoke prompts",
            path, served_name, staging_name(served_name),
        )
    say(f"validate {path}")
    try:
        info = validate_adapter(path, base_model_dir_or_id=base_model, max_lora_rank=max_lora_rank)
    except AdapterValidationError as err:
        raise fail("validate", None, str(err)) from err
    report.adapter = info.to_dict()
    if previous is not None and not (Path(previous) / ADAPTER_CONFIG).is_file():
        raise fail(
            "validate",
            None,
            f"the previous adapter {previous} (the rollback target) is gone; vLLM re-reads a served "
            "adapter from disk, so put it back, or pass previous_adapter_dir=None",
        )

    clients = [VllmClient(ep.endpoint, api_key=api_key, timeout_s=timeout_s) for ep in report.endpoints]
    plan = _Plan(
        served_name=served_name,
        staging=staging_name(served_name),
        path=path,
        cases=cases,
        previous=previous,
        scorer=scorer,
        min_agreement=verify_min_agreement,
        max_tokens=max_tokens,
        progress=say,
    )
    try:
        for client, ep in zip(clients, report.endpoints, strict=True):  # no swap before all answer
            with _step(ep, "preflight", say) as record:
                client.check_health()
                names = {str(m["id"]): m for m in client.models()}
                if base_name(served_name) not in names:
                    raise _StepFailed(
                        "preflight",
                        f"{client.base_url} does not serve {base_name(served_name)} (it serves {sorted(names)}): "
                        "start it with `make serve`",
                    )
                record.detail = f"serves {base_name(served_name)} from {names[base_name(served_name)].get('root')}"
    except _StepFailed as err:
        for client in clients:
            client.close()
        raise fail(err.step, ep.endpoint, err.cause) from (err.__cause__ or err)

    done: list[tuple[VllmClient, EndpointReport]] = []
    try:
        for client, ep in zip(clients, report.endpoints, strict=True):
            say(f"deploy {path} -> {ep.endpoint} ({len(done) + 1}/{len(clients)})")
            try:
                _deploy_endpoint(client, ep, plan)
            except BaseException as err:
                if ep.status == "pending":
                    ep.status = "failed"
                notes = [_rollback_note(ep, served_name)]
                for done_client, done_ep in reversed(done):
                    say(f"roll back {done_ep.endpoint} (deployed before {ep.endpoint} failed)")
                    ok = _restore_endpoint(done_client, done_ep, plan)
                    done_ep.status = "rolled_back" if ok else "rollback_failed"
                    notes.append(_rollback_note(done_ep, served_name))
                if not isinstance(err, _StepFailed):
                    raise
                cause = "; ".join([err.cause, *(note for note in notes if note)])
                raise fail(err.step, ep.endpoint, cause) from (err.__cause__ or err)
            done.append((client, ep))
    finally:
        for client in clients:
            client.close()
    report.ok = True
    report.seconds = round(time.perf_counter() - started, 3)
    say(f"deployed {path} as {served_name} on {len(done)} endpoint(s) in {report.seconds:.1f} s")
    return report


def _rollback_note(ep: EndpointReport, served_name: str) -> str:
    """A clause for the error message saying what happened to the stable name on ``ep``."""
    if ep.status == "rolled_back":
        return f"{ep.endpoint}: {served_name} rolled back ({ep.steps[-1].detail})"
    if ep.status == "rollback_failed":
        return f"{ep.endpoint}: ROLLBACK FAILED, {served_name} may serve the new adapter: {ep.steps[-1].detail}"
    if ep.status == "failed":
        return f"{ep.endpoint}: {served_name} untouched"
    return ""


# -- reconcile ------------------------------------------------------------------------------


@dataclass
class ReconcileRecord:
    """What reconcile found and did on one endpoint."""

    endpoint: str
    before: str | None = None  # the adapter directory the stable name served, None if not loaded
    action: str = "pending"  # in_sync | loaded | unloaded | failed
    detail: str = ""
    seconds: float = 0.0


def reconcile(
    endpoints: Sequence[str],
    adapter_dir: str | os.PathLike[str] | None,
    *,
    served_name: str,
    base_model: str | os.PathLike[str],
    max_lora_rank: int,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    progress: Progress | None = None,
) -> list[ReconcileRecord]:
    """Make every endpoint's stable name serve exactly ``adapter_dir`` (None: no adapter at all).

    Run after a vLLM restart (the server forgot its runtime adapters), before a deploy (so the
    restore target is what really serves), and after a failed deploy, verify or registry
    write (so the servers agree with the registry again). An endpoint already serving
    ``adapter_dir`` is only checked to answer; another is loaded in place (no window without
    the name), checked to list the new root and to answer. Every endpoint is tried even if
    one fails; then :class:`DeployError` (step ``reconcile``) names each failure.
    """

    say = _reporter(progress)

    path = str(Path(adapter_dir).resolve()) if adapter_dir is not None else None
    if path is not None:
        try:
            validate_adapter(path, base_model_dir_or_id=base_model, max_lora_rank=max_lora_rank)
        except AdapterValidationError as err:
            raise DeployError(f"reconcile refused {path}: {err}", step="reconcile", endpoint=None) from err
    records = [ReconcileRecord(endpoint=url.rstrip("/")) for url in endpoints]
    for record in records:
        started = time.perf_counter()
        try:
            with VllmClient(record.endpoint, api_key=api_key, timeout_s=timeout_s) as client:
                client.check_health()
                record.before = client.adapters().get(served_name)
                if record.before == path:
                    if path is not None:
                        client.chat(served_name, "ping", max_tokens=1)
                    record.action, record.detail = "in_sync", f"{served_name} already serves {path or 'no adapter'}"
                else:  # the same in-place load (or unload) and checks a failed deploy's restore does
                    record.detail = restore(client, served_name=served_name, previous_adapter_dir=path)
                    record.action = "unloaded" if path is None else "loaded"
        except (DeployError, VllmError, ValueError, OSError) as err:
            record.action, record.detail = "failed", str(err)
        record.seconds = round(time.perf_counter() - started, 3)
        say(f"reconcile {record.endpoint}: {record.action}: {record.detail}")
    failed = [r for r in records if r.action == "failed"]
    if failed:
        want = path or "no adapter"
        raise DeployError(
            f"reconcile to {want} failed on {len(failed)} of {len(records)} endpoint(s): "
            + "; ".join(f"{r.endpoint}: {r.detail}" for r in failed)
            + ". Fix the server (is it up? `make serve`) and run `tuneloop reconcile` again",
            step="reconcile",
            endpoint=failed[0].endpoint,
        )
    return records
