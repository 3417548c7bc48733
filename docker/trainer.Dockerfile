# The pinned CUDA trainer image: `tuneloop train` on one NVIDIA GPU. The refresh DAG's train
# task runs it as a Kubernetes pod (training_runner: kubernetes, include/tuneloop/kubernetes.py;
# docker/trainer-pod.example.yaml is the pod it renders); compose.gpu.yaml runs it on one host.
# Not buildable here (no Docker engine, no GPU); the same package trains on the CPU locally.
#   docker build -f docker/trainer.Dockerfile -t REGISTRY/tuneloop-trainer:0.1.0-cu128 .
#   docker run --gpus all -e TUNELOOP__STORE__URI=s3://bucket/tuneloop REGISTRY/tuneloop-trainer:0.1.0-cu128 \
#       train --snapshot latest --version v7
# torch's CUDA wheels carry the CUDA runtime and cuDNN; the host needs only the NVIDIA driver
# (one that supports CUDA 12.8). Every version below is pinned: the ML packages to the exact
# versions of requirements/ml.lock (tests/unit/test_kubernetes_pod.py checks they agree), the
# rest through the lock as a constraints file; only torch differs: its CUDA build, not +cpu.
FROM python:3.11.12-slim-bookworm

ARG TORCH_CUDA=cu128
ENV TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tuneloop
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"
COPY requirements/ml.lock /tmp/ml.lock
# The lock pins torch==2.13.0+cpu: drop that line so the CUDA torch above stays.
RUN grep -v '^torch==' /tmp/ml.lock > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt \
        "transformers==5.19.0" "peft==0.21.2" "accelerate==1.15.0" "trl==1.16.0" "datasets==5.2.0" \
        "bitsandbytes==0.50.2" "safetensors==0.8.0" "tokenizers==0.23.3" \
        "huggingface-hub==2.4.0" "boto3==1.44.5" "pydantic==2.14.3" "pyyaml==6.0.3" "numpy==2.3.5" \
    && rm /tmp/ml.lock /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY include ./include
RUN pip install --no-cache-dir --no-deps -e . \
    && useradd --uid 1000 --create-home --shell /usr/sbin/nologin trainer \
    && mkdir -p /var/lib/tuneloop && chown trainer /var/lib/tuneloop
# uid 1000 = kubernetes.TRAINER_UID: the pod runs as it, with fsGroup 1000 on the work volume.
USER 1000
ENV TUNELOOP__WORK_DIR=/var/lib/tuneloop
ENTRYPOINT ["tuneloop"]
CMD ["--help"]
