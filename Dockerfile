# Astro CLI image (`astro dev start`): Astro Runtime 3.3 = Apache Airflow 3.3.
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
USER astro
