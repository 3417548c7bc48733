# LoRA trainer for GPU workers (CUDA). Runs `tuneloop train` against the configured store.
# Not buildable here (no Docker engine, no GPU); the same package runs on the CPU locally.
#   docker build -f docker/trainer.Dockerfile -t tuneloop-trainer .
#   docker run --gpus all -e TUNELOOP__STORE__URI=s3://bucket/tuneloop tuneloop-trainer \
#       train --snapshot latest --version v7
# torch's CUDA wheels carry the CUDA runtime; the host needs only the NVIDIA driver.
FROM python:3.11-slim

ARG TORCH_CUDA=cu128
ENV TOKENIZERS_PARALLELISM=false
WORKDIR /opt/tuneloop
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"
RUN pip install --no-cache-dir "transformers>=5.16.1,<5.20" peft accelerate safetensors tokenizers \
        boto3 pydantic pyyaml numpy
COPY pyproject.toml README.md ./
COPY include ./include
RUN pip install --no-cache-dir --no-deps -e .
ENTRYPOINT ["tuneloop"]
CMD ["--help"]
