# vLLM OpenAI server (CUDA), the same vLLM release as the CPU build tested here (0.32.0), with runtime LoRA updating, for GPU nodes.
# Not buildable here (no Docker engine, no GPU); locally `make serve` runs the CPU build.
# Keep this endpoint on a private network and behind an API key: vLLM calls runtime LoRA
# updating a development feature. The key is VLLM_API_KEY in the container's environment, which
# vLLM reads when no --api-key is given: on the command line it would show in /proc/*/cmdline.
FROM vllm/vllm-openai:v0.32.0

ENV VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    VLLM_NO_USAGE_STATS=1
# tuneloop itself (no dependencies beyond boto3: vLLM brings pydantic, pyyaml, numpy, httpx)
# for its LoRA resolver plugin: with TUNELOOP_ADAPTER_CACHE set, the server fetches each
# adapter version from the tuneloop store (vllm.adapter_source: store; docs/serving.md).
WORKDIR /opt/tuneloop
COPY pyproject.toml README.md ./
COPY include ./include
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir boto3
# The base model is mounted or pulled by the deployment (BASE_MODEL); adapters arrive at
# run time through POST /v1/load_lora_adapter from tuneloop's deploy step, read from the
# shared adapter volume (/adapters) or fetched from the store into TUNELOOP_ADAPTER_CACHE.
VOLUME ["/adapters"]
ENTRYPOINT ["/bin/sh", "-c", "exec python3 -m vllm.entrypoints.openai.api_server \
    --model \"$BASE_MODEL\" --served-model-name \"${SERVED_MODEL_NAME:-tuneloop-base}\" \
    --enable-lora --max-lora-rank \"${MAX_LORA_RANK:-16}\" --max-loras \"${MAX_LORAS:-4}\" \
    --max-cpu-loras \"${MAX_CPU_LORAS:-8}\" \
    --host 0.0.0.0 --port 8000 $VLLM_EXTRA_ARGS"]
