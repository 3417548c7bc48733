# Astro CLI image (`astro dev start`): Astro Runtime 3.3 = Apache Airflow 3.3. 3.3-2 is the newest
# 3.3 patch in Astronomer's Runtime provider reference as last read (docs/deployment.md); which
# Airflow 3.3.x it ships could not be established there, and the tests ran on 3.3.2
# (requirements/airflow.lock): check `docker run --rm IMAGE airflow version` when you bump it.
# Not buildable on the development machine (no Docker engine); kept in step with
# requirements/airflow.in (requirements.txt; packages.txt stays empty: no OS packages needed).
# docker-compose.override.yml adds MinIO (the store) and a CPU vLLM server beside Airflow.
# The training and serving images live in docker/.
FROM astrocrpublic.azurecr.io/runtime:3.3-2

# tuneloop's package lives in include/ (copied to /usr/local/airflow/include by the base image).
ENV PYTHONPATH="/usr/local/airflow/include:${PYTHONPATH}" \
    GX_ANALYTICS_ENABLED=false \
    HF_HUB_OFFLINE=1 \
    TUNELOOP_CONFIG=/usr/local/airflow/examples/invoices/tuneloop.yaml

# The volume shared with the vLLM container (served adapters, the demo base model): owned by
# the `astro` user that runs the tasks, whichever container mounts the fresh volume first.
USER root
RUN mkdir -p /shared/adapters /shared/models && chown -R astro:0 /shared
# The ML environment the train and evaluate steps run in (the Airflow env has no torch):
# CPU torch and the ml.lock versions of docker/ml-requirements.txt in a venv of its own, found
# through TUNELOOP_ML_PYTHON. With training_runner: kubernetes the ML steps run in the trainer
# image instead, and this layer may be dropped; evaluation through vLLM needs neither.
COPY docker/ml-requirements.txt /opt/tuneloop-ml-requirements.txt
RUN python -m venv /opt/tuneloop-ml \
    && /opt/tuneloop-ml/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /opt/tuneloop-ml-requirements.txt \
    && chown -R astro:0 /opt/tuneloop-ml
ENV TUNELOOP_ML_PYTHON=/opt/tuneloop-ml/bin/python
USER astro
