# tuneloop: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV    := .venv
VENV_ML := .venv-ml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: help setup test test-fast lint demo airflow serve serve-stop gateway gateway-stop bench bench-setup mlflow docs clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: ## build .venv (Airflow, GX, boto3) and .venv-ml (vLLM CPU, torch, peft) from the lock files
	@bash scripts/setup.sh

test: setup ## run the whole test suite (both environments)
	@bash scripts/run_tests.sh

test-fast: setup ## the unit tests of the orchestration env: no Airflow run, no vLLM, no training (under two minutes)
	@.venv/bin/python -m pytest -m "unit and not ml and not slow" tests/unit -q

lint: setup ## ruff + mypy
	$(VENV)/bin/ruff check include dags plugins tests bench
	$(VENV)/bin/mypy

demo: setup ## run the whole loop on the invoice example (examples/invoices: tiny model, local store, CPU, real vLLM + Airflow)
	@bash scripts/demo.sh

airflow: setup ## Airflow 3 standalone with the tuneloop DAGs: UI on http://localhost:8080 (admin/admin)
	@bash scripts/airflow.sh

serve: setup ## start the real vLLM OpenAI server (CPU build) with runtime LoRA; reconciles it to production
	@$(VENV)/bin/tuneloop build-model
	@bash scripts/serve.sh start
	@$(VENV)/bin/tuneloop reconcile

serve-stop: ## stop the vLLM server started by `make serve`
	@bash scripts/serve.sh stop

gateway: setup ## start the nginx gateway on :8088 (serving.rollout switch|canary: clients call the stable name there)
	@$(VENV)/bin/tuneloop gateway start

gateway-stop: ## stop the gateway started by `make gateway`
	@$(VENV)/bin/tuneloop gateway stop

bench-setup: ## build .venv-bench (Evidently, the reference library bench/drift_speed.py compares with)
	@bash scripts/setup.sh bench

mlflow: ## MLflow's UI on http://localhost:5000 over the loop's tracking store (tracking.mlflow; builds .venv-mlflow)
	@bash scripts/setup.sh mlflow
	@mkdir -p .tuneloop
	.venv-mlflow/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.tuneloop/mlflow.db --port $${MLFLOW_PORT:-5000}

docs: ## build the documentation site into site/ (MkDocs Material, strict: any warning fails; own env .venv-docs)
	@bash scripts/docs.sh

clean: ## remove the local store, models, adapters and eval outputs (keeps the environments)
	rm -rf .tuneloop
