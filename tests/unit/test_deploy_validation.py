"""Adapter validation, the vLLM client's error handling and the deploy/rollback logic.

No torch and no real vLLM: adapters are written by hand (adapter_config.json plus a
safetensors file whose header and bytes are composed here), and the server is a small
stdlib ``http.server`` on 127.0.0.1 that answers like vLLM 0.32 (plain-text "Success: ..."
on loads, JSON errors, FastAPI's ``{"detail": "Not Found"}`` for unknown routes).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from tuneloop import cli
from tuneloop.serving.adapters import (
    AdapterValidationError,
    check_lora_name,
    read_safetensors_header,
    validate_adapter,
)
from tuneloop.serving.deploy import DeployError, deploy_adapter, reconcile
from tuneloop.serving.vllm_client import VllmClient, VllmDownError, VllmError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.unit

HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE, LAYERS = 128, 2, 64, 256, 2
DIMS = {  # (in_features, out_features)
    "self_attn.q_proj": (HIDDEN, HEADS * HEAD_DIM),
    "self_attn.v_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


# -- hand-made models and adapters ----------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file: 8-byte LE header length, JSON header, zero-filled data."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * itemsize[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def make_base(directory: Path, *, hidden: int = HIDDEN) -> Path:
    directory.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": LAYERS,
        "vocab_size": 512,
        "transformers_version": "5.19.0",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def lora_tensors(rank: int, dims: dict[str, tuple[int, int]] = DIMS) -> dict[str, tuple[str, list[int]]]:
    tensors = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = ("F32", [rank, fan_in])
            tensors[f"{prefix}.lora_B.weight"] = ("F32", [fan_out, rank])
    return tensors


def make_adapter(
    directory: Path,
    base: Path | str,
    *,
    rank: int = 8,
    tensors: dict[str, tuple[str, list[int]]] | None = None,
    **config_overrides: Any,
) -> Path:
    directory.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "task_type": "CAUSAL_LM",
        **config_overrides,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    write_safetensors(directory / "adapter_model.safetensors", tensors or lora_tensors(rank))
    return directory


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_base(tmp_path / "base")


def problems_of(adapter: Path, base: Path | str, max_lora_rank: int = 16) -> list[str]:
    with pytest.raises(AdapterValidationError) as caught:
        validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=max_lora_rank)
    assert str(adapter) in str(caught.value)
    return caught.value.problems


# -- validation -----------------------------------------------------------------------------


def test_good_adapter_passes(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "good", base)
    info = validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=16)
    assert info.rank == 8
    assert info.n_tensors == 2 * LAYERS * len(DIMS)
    assert info.base_match == "same name"
    assert len(info.weights_sha256) == 64
    assert info.warnings == []
    json.dumps(info.to_dict())


def test_same_base_at_another_path_matches_by_config(tmp_path: Path, base: Path) -> None:
    copy = make_base(tmp_path / "copy-of-base")
    adapter = make_adapter(tmp_path / "a", copy)
    info = validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=16)
    assert info.base_match.startswith("same config.json")


def test_same_base_through_a_symlink_matches_by_path(tmp_path: Path, base: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(base)
    adapter = make_adapter(tmp_path / "a", link)
    assert validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=16).base_match == "same path"


def test_wrong_peft_type(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "ia3", base, peft_type="IA3")
    assert problems_of(adapter, base) == ["peft_type is 'IA3', expected 'LORA'"]


def test_base_mismatch_names_both_models(tmp_path: Path, base: Path) -> None:
    other = make_base(tmp_path / "other-base", hidden=256)
    adapter = make_adapter(tmp_path / "a", other, tensors=lora_tensors(8))
    problems = problems_of(adapter, base)
    mismatch = [p for p in problems if p.startswith("base model mismatch")]
    assert len(mismatch) == 1
    assert str(other) in mismatch[0] and str(base) in mismatch[0]


def test_base_that_does_not_exist_here_is_refused(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "a", "/nowhere/base-model")
    (problem,) = problems_of(adapter, base)
    assert "/nowhere/base-model" in problem and str(base) in problem and "cannot be compared" in problem


def test_rank_above_server_max(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "big", base, rank=32)
    assert problems_of(adapter, base, max_lora_rank=16) == [
        "rank 32 exceeds the server's max_lora_rank 16 "
        "(retrain with a smaller rank or restart vLLM with a larger --max-lora-rank)"
    ]


def test_rank_pattern_above_server_max(tmp_path: Path, base: Path) -> None:
    tensors = lora_tensors(8)
    tensors.update(lora_tensors(64, {"mlp.down_proj": DIMS["mlp.down_proj"]}))
    adapter = make_adapter(tmp_path / "a", base, tensors=tensors, rank_pattern={"down_proj": 64})
    assert any("rank 64 exceeds" in p for p in problems_of(adapter, base))


def test_pickle_weights_are_refused(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "bin", base)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    problems = problems_of(adapter, base)
    assert any("pickle weights ['adapter_model.bin'] are refused" in p for p in problems)
    assert "adapter_model.safetensors is missing" in problems


def test_other_pickles_only_warn(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "a", base)
    (adapter / "training_args.bin").write_bytes(b"\x80\x04N.")
    info = validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=16)
    assert any("training_args.bin" in w for w in info.warnings)


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        (lambda raw: struct.pack("<Q", len(raw) * 10) + raw[8:], "exceeds the file"),
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "header is not valid JSON"),
        (lambda raw: raw[:-4], "-byte data section"),
        (lambda raw: raw[:5], "too short"),
    ],
    ids=["length-beyond-file", "bad-json", "truncated-data", "too-short"],
)
def test_corrupt_safetensors(tmp_path: Path, base: Path, corruption: Any, message: str) -> None:
    adapter = make_adapter(tmp_path / "bad", base)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(corruption(weights.read_bytes()))
    (problem,) = problems_of(adapter, base)
    assert problem.startswith("corrupt safetensors:") and message in problem


def test_header_whose_offsets_do_not_match_dtype_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(60))
    with pytest.raises(ValueError, match=r"spans 60 bytes but F32 x \[4, 4\] needs 64"):
        read_safetensors_header(path)


def test_missing_files(tmp_path: Path, base: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems_of(empty, base) == ["adapter_config.json is missing", "adapter_model.safetensors is missing"]
    assert problems_of(tmp_path / "nope", base) == [f"{tmp_path / 'nope'} is not a directory"]


def test_unparsable_config(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "a", base)
    (adapter / "adapter_config.json").write_text("{'r': 8")
    (problem,) = problems_of(adapter, base)
    assert problem.startswith("adapter_config.json is not valid JSON")


def test_shapes_that_do_not_fit_the_base_model(tmp_path: Path, base: Path) -> None:
    wide = {module: (fan_in * 2, fan_out * 2) for module, (fan_in, fan_out) in DIMS.items()}
    adapter = make_adapter(tmp_path / "a", base, tensors=lora_tensors(8, wide))
    problems = problems_of(adapter, base)
    assert len(problems) == LAYERS * len(DIMS)
    assert (
        "module model.layers.0.self_attn.q_proj: LoRA maps 256 -> 256 features but the base model's "
        "q_proj maps 128 -> 128 (hidden_size 128)"
    ) in problems


def test_non_lora_tensors_and_unpaired_matrices(tmp_path: Path, base: Path) -> None:
    tensors = lora_tensors(8)
    tensors["base_model.model.lm_head.weight"] = ("F32", [512, HIDDEN])
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    adapter = make_adapter(tmp_path / "a", base, tensors=tensors)
    problems = problems_of(adapter, base)
    assert any("lm_head.weight is not a LoRA A/B matrix" in p for p in problems)
    assert any("model.layers.1.mlp.down_proj has lora_A but not lora_B" in p for p in problems)


def test_every_problem_is_listed_at_once(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "a", base, rank=32, peft_type="LOHA", use_dora=True)
    (adapter / "adapter_model.bin").write_bytes(b"")
    problems = problems_of(adapter, base)
    assert len(problems) == 4
    assert "4 problem(s)" in str(AdapterValidationError(adapter, problems))


# -- a fake vLLM server ---------------------------------------------------------------------


class FakeVllm:
    """Answers like vLLM 0.32: adapters by name, greedy answers that depend on the adapter path.

    ``answer(model, prompt)`` is ``"<adapter dir name>:<prompt>"`` (``base`` for the base model),
    so a test can tell which adapter answered. ``fail_loads`` maps a path to an HTTP status
    that loading it returns; a load of a (name, path) in ``stale_loads`` is listed but the name keeps
    answering with the weights it had (the stale-cache failure verification must catch).
    """

    def __init__(self, *, lora_routes: bool = True, api_key: str | None = None) -> None:
        self.adapters: dict[str, str] = {}
        self.fail_loads: dict[str, int] = {}
        self.stale_loads: set[tuple[str, str]] = set()
        self.answering: dict[str, str] = {}
        self.loads: list[tuple[str, str, bool]] = []
        self.auth_headers: list[str | None] = []
        self.lora_routes = lora_routes
        self.api_key = api_key
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any) -> None:
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:
                fake.auth_headers.append(self.headers.get("Authorization"))
                if self.path == "/health":
                    self.reply(200, "")
                elif self.path == "/v1/models":
                    data = [{"id": "tuneloop-base", "root": "/models/base", "parent": None}]
                    data += [{"id": n, "root": p, "parent": "tuneloop-base"} for n, p in fake.adapters.items()]
                    self.reply(200, {"object": "list", "data": data})
                elif self.path == "/metrics":
                    self.reply(200, "vllm:num_requests_running 0\n")
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                fake.auth_headers.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self.reply(401, {"error": "Unauthorized"})
                elif self.path == "/v1/load_lora_adapter" and fake.lora_routes:
                    self.load(body)
                elif self.path == "/v1/unload_lora_adapter" and fake.lora_routes:
                    with fake.lock:
                        if fake.adapters.pop(body["lora_name"], None) is None:
                            self.reply(404, error(f"The lora adapter '{body['lora_name']}' cannot be found.", "NotFoundError", 404))
                        else:
                            self.reply(200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")
                elif self.path == "/v1/chat/completions":
                    self.chat(body)
                else:
                    self.reply(404, {"detail": "Not Found"})

            def load(self, body: dict[str, Any]) -> None:
                name, path, inplace = body["lora_name"], body["lora_path"], body.get("load_inplace", False)
                fake.loads.append((name, path, inplace))
                with fake.lock:
                    if path in fake.fail_loads:
                        status = fake.fail_loads[path]
                        self.reply(status, error("Call to add_lora method failed: LoRA rank 32 is greater than max_lora_rank 16.", "InternalServerError", status))
                    elif name in fake.adapters and not inplace:
                        self.reply(400, error(f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput", 400))
                    else:
                        fake.adapters[name] = path
                        if (name, path) not in fake.stale_loads or name not in fake.answering:
                            fake.answering[name] = path
                        self.reply(200, f"Success: LoRA adapter '{name}' added successfully.")

            def chat(self, body: dict[str, Any]) -> None:
                model, prompt = body["model"], body["messages"][-1]["content"]
                with fake.lock:
                    if model == "tuneloop-base":
                        source = "base"
                    elif model in fake.adapters:
                        source = os.path.basename(fake.answering[model])
                    else:
                        self.reply(404, error(f"The model `{model}` does not exist.", "NotFoundError", 404))
                        return
                self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"{source}:{prompt}"}}]})

        def error(message: str, kind: str, code: int) -> dict[str, Any]:
            return {"error": {"message": message, "type": kind, "param": None, "code": code}}

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeVllm:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    with FakeVllm() as server:
        yield server


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (bound, then closed)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- client ---------------------------------------------------------------------------------


def test_load_returns_the_plain_text_success(fake: FakeVllm) -> None:
    with VllmClient(fake.url) as client:
        assert client.load_adapter("tuneloop", "/a/v1", inplace=True) == "Success: LoRA adapter 'tuneloop' added successfully."
        assert client.adapters() == {"tuneloop": "/a/v1"}
        assert client.unload_adapter("tuneloop").startswith("Success: LoRA adapter 'tuneloop' removed")
    assert fake.loads == [("tuneloop", "/a/v1", True)]


def test_json_error_carries_status_endpoint_and_message(fake: FakeVllm) -> None:
    fake.fail_loads["/a/big"] = 500
    with VllmClient(fake.url) as client, pytest.raises(VllmError) as caught:
        client.load_adapter("tuneloop-staging", "/a/big", inplace=True)
    assert caught.value.status == 500
    assert caught.value.endpoint == fake.url
    assert fake.url in str(caught.value)
    assert "InternalServerError: Call to add_lora method failed: LoRA rank 32 is greater than max_lora_rank 16." in str(caught.value)


def test_404s(fake: FakeVllm) -> None:
    with VllmClient(fake.url) as client:
        with pytest.raises(VllmError, match="cannot be found") as caught:
            client.unload_adapter("nope")
        assert caught.value.status == 404
        with pytest.raises(VllmError, match="does not exist") as caught:
            client.chat("nope", "hi", max_tokens=4)
        assert caught.value.status == 404


def test_missing_lora_routes_hint_at_the_env_var() -> None:
    with FakeVllm(lora_routes=False) as server, VllmClient(server.url) as client:
        with pytest.raises(VllmError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True") as caught:
            client.load_adapter("tuneloop", "/a/v1", inplace=True)
    assert caught.value.status == 404


def test_connection_refused_says_the_server_is_down() -> None:
    url = closed_port_url()
    with VllmClient(url, timeout_s=5) as client:
        assert client.health() is False
        with pytest.raises(VllmDownError) as caught:
            client.models()
    assert str(caught.value).startswith(f"vLLM at {url} is down")
    assert str(caught.value).endswith("start it with `make serve`")
    assert caught.value.status is None


def test_wait_healthy_gives_up_with_the_endpoint_named() -> None:
    url = closed_port_url()
    with VllmClient(url, timeout_s=5) as client, pytest.raises(VllmError, match=f"vLLM at {url} did not become healthy"):
        client.wait_healthy(timeout_s=0.3, poll_s=0.1)


def test_bearer_auth_and_401_hint() -> None:
    with FakeVllm(api_key="s3cret") as server:
        with VllmClient(server.url, api_key="s3cret") as client:
            assert client.chat("tuneloop-base", "hi", max_tokens=4) == "base:hi"
        assert server.auth_headers[-1] == "Bearer s3cret"
        with VllmClient(server.url) as client, pytest.raises(VllmError, match="TUNELOOP__VLLM__API_KEY") as caught:
            client.chat("tuneloop-base", "hi", max_tokens=4)
        assert caught.value.status == 401


def test_chat_many_keeps_prompt_order(fake: FakeVllm) -> None:
    prompts = [f"p{i}" for i in range(20)]
    with VllmClient(fake.url) as client:
        assert client.chat_many("tuneloop-base", prompts, max_tokens=4, concurrency=6) == [f"base:{p}" for p in prompts]
        assert client.metrics().startswith("vllm:")


# -- deploy orchestration against the fake ----------------------------------------------------


def golden_for(adapter: Path) -> list[dict[str, str]]:
    return [{"id": f"g{i}", "prompt": f"q{i}", "expected": f"{adapter.name}:q{i}"} for i in range(4)]


@pytest.fixture
def adapters(tmp_path: Path, base: Path) -> dict[str, Path]:
    return {name: make_adapter(tmp_path / name, base) for name in ("v1", "v2")}


def deploy(fake_urls: list[str], adapter: Path, base: Path, previous: Path | None, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"golden": golden_for(adapter), "verify_min_agreement": 1.0, "max_tokens": 8}
    options.update(kwargs)
    return deploy_adapter(
        fake_urls,
        adapter,
        served_name="tuneloop",
        previous_adapter_dir=previous,
        max_lora_rank=16,
        base_model=base,
        **options,
    )


def test_deploy_swaps_in_place_and_reports(fake: FakeVllm, adapters: dict[str, Path], base: Path) -> None:
    report = deploy([fake.url], adapters["v1"], base, None)
    assert report.ok and report.endpoints[0].status == "deployed"
    assert fake.adapters == {"tuneloop-staging": str(adapters["v1"]), "tuneloop": str(adapters["v1"])}
    assert all(inplace for _, _, inplace in fake.loads)
    steps = [s.step for s in report.endpoints[0].steps]
    assert steps == ["preflight", "health", "load_staging", "verify_staging", "load_stable", "verify_stable"]
    assert report.endpoints[0].stable is not None and report.endpoints[0].stable["agreement"] == 1.0
    json.loads(report.to_json())
    report = deploy([fake.url], adapters["v2"], base, adapters["v1"])
    assert report.ok and fake.adapters["tuneloop"] == str(adapters["v2"])
    assert "snapshot_stable" in [s.step for s in report.endpoints[0].steps]


def test_stale_stable_answers_roll_back(fake: FakeVllm, adapters: dict[str, Path], base: Path) -> None:
    deploy([fake.url], adapters["v1"], base, None)
    fake.stale_loads.add(("tuneloop", str(adapters["v2"])))  # loaded, listed, but the old weights still answer
    with pytest.raises(DeployError) as caught:
        deploy([fake.url], adapters["v2"], base, adapters["v1"])
    err = caught.value
    assert err.step == "verify_stable" and err.endpoint == fake.url
    assert f"to {fake.url} failed at step verify_stable" in str(err) and "rolled back" in str(err)
    assert fake.adapters["tuneloop"] == str(adapters["v1"])
    assert err.report is not None and err.report.endpoints[0].status == "rolled_back"


def test_server_error_on_staging_leaves_stable_untouched(fake: FakeVllm, adapters: dict[str, Path], base: Path) -> None:
    deploy([fake.url], adapters["v1"], base, None)
    fake.fail_loads[str(adapters["v2"])] = 500
    with pytest.raises(DeployError, match="failed at step load_staging: .*LoRA rank 32") as caught:
        deploy([fake.url], adapters["v2"], base, adapters["v1"])
    assert "tuneloop untouched" in str(caught.value)
    assert fake.adapters["tuneloop"] == str(adapters["v1"])
    assert not any(name == "tuneloop" and path == str(adapters["v2"]) for name, path, _ in fake.loads)


def test_canary_failure_rolls_back_earlier_endpoints(adapters: dict[str, Path], base: Path) -> None:
    with FakeVllm() as first, FakeVllm() as second:
        deploy([first.url, second.url], adapters["v1"], base, None)
        second.stale_loads.add(("tuneloop", str(adapters["v2"])))
        with pytest.raises(DeployError) as caught:
            deploy([first.url, second.url], adapters["v2"], base, adapters["v1"])
        assert caught.value.endpoint == second.url and caught.value.step == "verify_stable"
        assert first.adapters["tuneloop"] == second.adapters["tuneloop"] == str(adapters["v1"])
        report = caught.value.report
        assert report is not None
        assert [ep.status for ep in report.endpoints] == ["rolled_back", "rolled_back"]
        assert f"{first.url}: tuneloop rolled back" in str(caught.value)


def test_first_deploy_failure_unloads_the_stable_name(fake: FakeVllm, adapters: dict[str, Path], base: Path) -> None:
    calls = {"n": 0}

    def fails_on_second_pass(answer: str, expected: str) -> float:
        calls["n"] += 1
        return 1.0 if calls["n"] <= 4 else 0.0

    with pytest.raises(DeployError, match="verify_stable"):
        deploy([fake.url], adapters["v1"], base, None, scorer=fails_on_second_pass)
    assert "tuneloop" not in fake.adapters


def test_down_endpoint_fails_before_any_swap(fake: FakeVllm, adapters: dict[str, Path], base: Path) -> None:
    down = closed_port_url()
    with pytest.raises(DeployError) as caught:
        deploy([fake.url, down], adapters["v1"], base, None, timeout_s=5)
    assert caught.value.step == "preflight" and caught.value.endpoint == down
    assert f"vLLM at {down} is down" in str(caught.value)
    assert fake.loads == []


def test_invalid_adapter_is_never_sent(fake: FakeVllm, tmp_path: Path, base: Path) -> None:
    big = make_adapter(tmp_path / "big", base, rank=32)
    with pytest.raises(DeployError) as caught:
        deploy([fake.url], big, base, None)
    assert caught.value.step == "validate"
    assert isinstance(caught.value.__cause__, AdapterValidationError)
    assert fake.loads == []


def test_missing_rollback_target_is_refused(fake: FakeVllm, adapters: dict[str, Path], base: Path, tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="rollback target.*is gone"):
        deploy([fake.url], adapters["v2"], base, tmp_path / "deleted-v1")
    assert fake.loads == []


def test_without_golden_the_stable_name_must_answer_like_staging(
    fake: FakeVllm, adapters: dict[str, Path], base: Path
) -> None:
    report = deploy([fake.url], adapters["v1"], base, None, golden=[])
    assert report.ok and report.verification == "smoke"
    assert report.endpoints[0].stable is not None and report.endpoints[0].stable["agreement"] is None
    fake.stale_loads.add(("tuneloop", str(adapters["v2"])))
    with pytest.raises(DeployError, match="failed at step verify_stable: .*same answers as reference 0.00") as caught:
        deploy([fake.url], adapters["v2"], base, adapters["v1"], golden=[])
    assert "tuneloop rolled back" in str(caught.value)
    assert fake.adapters["tuneloop"] == str(adapters["v1"])


# -- paths and names that escape ------------------------------------------------------------


def test_links_out_of_the_adapter_directory_are_refused(tmp_path: Path, base: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    adapter = make_adapter(tmp_path / "a", base)
    (adapter / "tokenizer.json").symlink_to(outside)
    (adapter / "extra").symlink_to(tmp_path, target_is_directory=True)
    problems = problems_of(adapter, base)
    assert any(p.startswith("tokenizer.json is a link to") and "outside the adapter directory" in p for p in problems)
    assert any(p.startswith("extra is a link to") for p in problems)


def test_weights_linked_from_elsewhere_are_refused(tmp_path: Path, base: Path) -> None:
    real = make_adapter(tmp_path / "real", base)
    adapter = tmp_path / "linked"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text((real / "adapter_config.json").read_text())
    (adapter / "adapter_model.safetensors").symlink_to(real / "adapter_model.safetensors")
    assert any("adapter_model.safetensors is a link to" in p for p in problems_of(adapter, base))


def test_links_inside_the_adapter_directory_are_fine(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "a", base)
    (adapter / "alias.json").symlink_to(adapter / "adapter_config.json")
    assert validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=16).rank == 8


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "v1..", "-x", "", "x" * 65, "tune loop"])
def test_names_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="is not allowed"):
        check_lora_name(name)


@pytest.mark.parametrize("name", ["tuneloop", "tuneloop-staging", "v12", "acme.invoices_v2"])
def test_plain_names_pass(name: str) -> None:
    assert check_lora_name(name) == name


# -- tuneloop adapter check -----------------------------------------------------------------


def adapter_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(["adapter", "check", *args, "--json", "-q"])
    return code, json.loads(capsys.readouterr().out)


def test_adapter_check_accepts_a_good_adapter(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(tmp_path / "good", base)
    code, out = adapter_check(capsys, str(adapter), "--base-model", str(base), "--max-rank", "16", "--name", "tuneloop")
    assert code == 0 and out["valid"] and out["problems"] == []
    assert out["adapter"]["rank"] == 8 and out["adapter"]["peft_type"] == "LORA"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("not_lora", "peft_type is 'IA3', expected 'LORA'"),
        ("other_base", "base model mismatch"),
        ("rank", "rank 32 exceeds the server's max_lora_rank 16"),
        ("pickle", "pickle weights ['adapter_model.bin'] are refused"),
        ("missing", "adapter_model.safetensors is missing"),
        ("escape", "is a link to"),
        ("name", "adapter name '../prod' is not allowed"),
    ],
)
def test_adapter_check_names_each_problem(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str], kind: str, expected: str
) -> None:
    args: list[str] = []
    if kind == "not_lora":
        adapter = make_adapter(tmp_path / kind, base, peft_type="IA3")
    elif kind == "other_base":
        adapter = make_adapter(tmp_path / kind, make_base(tmp_path / "other", hidden=64))
    elif kind == "rank":
        adapter = make_adapter(tmp_path / kind, base, rank=32)
    elif kind == "pickle":
        adapter = make_adapter(tmp_path / kind, base)
        (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    elif kind == "missing":
        adapter = make_adapter(tmp_path / kind, base)
        (adapter / "adapter_model.safetensors").unlink()
    elif kind == "escape":
        adapter = make_adapter(tmp_path / kind, base)
        (adapter / "notes.txt").symlink_to("/etc/hostname")
    else:
        adapter = make_adapter(tmp_path / kind, base)
        args = ["--name", "../prod"]
    code, out = adapter_check(capsys, str(adapter), "--base-model", str(base), "--max-rank", "16", *args)
    assert code == 1 and not out["valid"]
    assert (out["adapter"] is not None) == (kind == "name")  # only a bad name leaves the adapter itself valid
    assert any(expected in problem for problem in out["problems"]), out["problems"]


def test_adapter_check_human_output_lists_problems(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = make_adapter(tmp_path / "big", base, rank=32, use_dora=True)
    code = cli.main(["adapter", "check", str(adapter), "--base-model", str(base), "--max-rank", "16"])
    out = capsys.readouterr().out
    assert code == 1
    assert "INVALID, 2 problem(s)" in out and "use_dora is true" in out and "rank 32" in out



LONG = "x" * 5000
# Every adapter_config.json key the checker (and vLLM's PEFTHelper) reads, with values of the
# wrong type or range: each is one finding naming the key, never a traceback.
WRONG_CONFIG_VALUES: list[tuple[str, Any]] = [
    *[("peft_type", v) for v in (["LORA"], {"LORA": 1}, LONG, 1, None)],
    *[("r", v) for v in ([8], "8", 8.5, 0, -8, True, None, {"r": 8})],
    *[("lora_alpha", v) for v in ([16], "16", {"alpha": 16}, 0, -1, True, None, float("nan"), float("inf"))],
    *[("target_modules", v) for v in (5, {"q_proj": 1}, [1, 2], [None], [], "", "(", True)],
    *[("rank_pattern", v) for v in ("down_proj=64", [64], 64, {"down_proj": "64"}, {"down_proj": [64]}, {"down_proj": 0}, {"down_proj": 8.5}, {"(": 8})],
    *[("alpha_pattern", v) for v in ("down_proj=16", [16], {"down_proj": "16"}, {"down_proj": None}, {"down_proj": -1}, {"[": 16})],
    *[("use_dora", v) for v in ("no", 1, [False])],
    *[("use_rslora", v) for v in ("yes", 0, {})],
    *[("lora_bias", v) for v in ("false", [True])],
    *[("bias", v) for v in ([1], 1, True, "some")],
    *[("modules_to_save", v) for v in ("lm_head", [1], {"lm_head": True}, 5)],
    *[("base_model_name_or_path", v) for v in ([1], 5, {"path": "x"}, True)],
]


@pytest.mark.parametrize(("key", "value"), WRONG_CONFIG_VALUES, ids=[f"{k}={str(v)[:12]}" for k, v in WRONG_CONFIG_VALUES])
def test_adapter_check_reports_a_wrong_config_value_as_a_finding(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any
) -> None:
    adapter = make_adapter(tmp_path / "a", base, **{key: value})
    code, out = adapter_check(capsys, str(adapter), "--base-model", str(base), "--max-rank", "16")
    assert code == 1 and not out["valid"]
    assert any(problem.startswith(key) for problem in out["problems"]), out["problems"]
    assert all(len(problem) < 400 for problem in out["problems"])
    assert LONG not in json.dumps(out)


def test_a_missing_lora_alpha_is_a_finding(tmp_path: Path, base: Path) -> None:
    adapter = make_adapter(tmp_path / "a", base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert problems_of(adapter, base) == [
        "lora_alpha is missing: vLLM requires it (peft writes it; set it to the alpha the adapter was trained with)"
    ]


@pytest.mark.parametrize(("key", "value"), [("torch_dtype", ["float16"]), ("dtype", {"a": 1}), ("task_type", 7)])
def test_keys_nobody_reads_may_hold_anything(tmp_path: Path, base: Path, key: str, value: Any) -> None:
    adapter = make_adapter(tmp_path / "a", base, **{key: value})
    assert validate_adapter(adapter, base_model_dir_or_id=base, max_lora_rank=16).rank == 8


def test_a_malformed_base_model_config_warns_instead_of_crashing(tmp_path: Path, base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_size": [HIDDEN], "num_attention_heads": "2"}))
    info = validate_adapter(make_adapter(tmp_path / "a", base), base_model_dir_or_id=base, max_lora_rank=16)
    assert any("config.json is malformed (hidden_size is [128], not a positive integer)" in w for w in info.warnings), info.warnings


def test_a_safetensors_header_with_a_list_dtype_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(ValueError, match=r"tensor 'w' has unknown dtype \['F32'\]"):
        read_safetensors_header(path)


# -- reconcile ------------------------------------------------------------------------------


def reconcile_to(urls: list[str], adapter: Path | None, base: Path) -> Any:
    return reconcile(urls, adapter, served_name="tuneloop", base_model=base, max_lora_rank=16, timeout_s=5)


def test_reconcile_loads_what_is_missing_and_leaves_what_is_right(adapters: dict[str, Path], base: Path) -> None:
    with FakeVllm() as right, FakeVllm() as stale, FakeVllm() as restarted:
        right.adapters["tuneloop"] = right.answering["tuneloop"] = str(adapters["v2"])
        stale.adapters["tuneloop"] = stale.answering["tuneloop"] = str(adapters["v1"])
        records = reconcile_to([right.url, stale.url, restarted.url], adapters["v2"], base)
        assert [r.action for r in records] == ["in_sync", "loaded", "loaded"]
        assert records[1].before == str(adapters["v1"]) and records[2].before is None
        for server in (right, stale, restarted):
            assert server.adapters["tuneloop"] == str(adapters["v2"])
        assert right.loads == [] and all(inplace for _, _, inplace in stale.loads + restarted.loads)


def test_reconcile_to_no_production_unloads_the_stable_name(fake: FakeVllm, adapters: dict[str, Path], base: Path) -> None:
    fake.adapters["tuneloop"] = fake.answering["tuneloop"] = str(adapters["v1"])
    records = reconcile_to([fake.url], None, base)
    assert records[0].action == "unloaded" and "tuneloop" not in fake.adapters
    assert reconcile_to([fake.url], None, base)[0].action == "in_sync"


def test_reconcile_tries_every_endpoint_and_names_the_failures(adapters: dict[str, Path], base: Path) -> None:
    down = closed_port_url()
    with FakeVllm() as first, FakeVllm() as last:
        last.fail_loads[str(adapters["v2"])] = 500
        with pytest.raises(DeployError) as caught:
            reconcile_to([first.url, down, last.url], adapters["v2"], base)
        message = str(caught.value)
        assert caught.value.step == "reconcile" and "failed on 2 of 3 endpoint(s)" in message
        assert f"{down}: vLLM at {down} is down" in message and f"{last.url}: " in message
        assert "`tuneloop reconcile`" in message
        assert first.adapters["tuneloop"] == str(adapters["v2"])  # the healthy one was still fixed


def test_reconcile_refuses_an_invalid_production_adapter(fake: FakeVllm, tmp_path: Path, base: Path) -> None:
    big = make_adapter(tmp_path / "big", base, rank=32)
    with pytest.raises(DeployError, match="(?s)reconcile refused .*rank 32"):
        reconcile_to([fake.url], big, base)
    assert fake.loads == []
